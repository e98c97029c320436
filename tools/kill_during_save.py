"""kill -9 during checkpoint saves (issue 9's crash test, standard library only).

    python tools/kill_during_save.py ./target/release/fgn-classifier SCRATCH_DIR [RUNS]

Trains a small cholesky network (digits, 256 hidden, 1 epoch: a 7 MB checkpoint) into
SCRATCH_DIR, then RUNS times starts the same training and kills it while a temp file of its save exists.
After each kill the target must still load and evaluate (old or new contents); at the end a
normal save must leave no temp file behind (stale ones of dead processes are cleaned)."""
import os, random, signal, subprocess, sys, time, json
B = sys.argv[1]; DIR = sys.argv[2]; N = int(sys.argv[3]) if len(sys.argv) > 3 else 100
os.makedirs(DIR, exist_ok=True)
target = os.path.join(DIR, "net.safetensors")
train = [B, "train", "--fgn-only", "--param", "cholesky", "--hidden", "256", "--epochs", "1", "--out", target]
subprocess.run(train, check=True, capture_output=True)
def temps():
    return [f for f in os.listdir(DIR) if "gauss-tmp" in f or f.endswith(".tmp")]
def valid():
    r = subprocess.run([B, "eval", target], capture_output=True, text=True)
    return r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1]).get("matches_saved") is True
rng = random.Random(0)
killed_in_save = 0; bad = 0; max_debris = 0; sizes = []
for i in range(N):
    p = subprocess.Popen(train, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hit = False
    while p.poll() is None:
        if temps():
            time.sleep(rng.uniform(0, 0.004))
            hit = bool(temps())
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0002)
    p.wait()
    killed_in_save += hit
    if not valid():
        bad += 1
    max_debris = max(max_debris, len(temps()))
debris_before = len(temps())
subprocess.run(train, check=True, capture_output=True)
print(json.dumps({"runs": N, "killed_during_save": killed_in_save, "invalid_targets_after_kill": bad,
                  "temp_files_before_final_save": debris_before, "temp_files_after_final_save": len(temps()),
                  "final_valid": valid(), "target_bytes": os.path.getsize(target)}))
