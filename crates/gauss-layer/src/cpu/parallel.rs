//! Parallel loops over the rayon pool (the one Candle's matmul uses), each with a result that
//! does not depend on the schedule.

use rayon::prelude::*;

/// Threads of the rayon pool the kernels run on (the one Candle's matmul uses too).
pub(crate) fn pool_threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Rows per parallel batch chunk: about two chunks per thread, so both cores stay busy while
/// each chunk amortizes its copy of the stacked factors.
pub(crate) fn rows_per_chunk(batch: usize) -> usize {
    batch.div_ceil(2 * pool_threads()).clamp(8, 1024)
}

/// Runs `work(i, chunk_a_i, chunk_b_i)` over matching chunks of two slices (`a` in chunks of
/// `a_len`, `b` in chunks of `b_len`), in parallel. Each chunk is written by one call, so the
/// result does not depend on the schedule.
pub(crate) fn for_each_chunk_pair_mut<T: Send, U: Send>(
    a: &mut [T],
    a_len: usize,
    b: &mut [U],
    b_len: usize,
    work: impl Fn(usize, &mut [T], &mut [U]) + Sync,
) {
    a.par_chunks_mut(a_len.max(1))
        .zip(b.par_chunks_mut(b_len.max(1)))
        .enumerate()
        .for_each(|(i, (a, b))| work(i, a, b));
}

/// Multiply-adds below which a loop runs on the calling thread: waking the pool costs more.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 18;

/// [`for_each_chunk_pair_mut`], or a plain loop on the calling thread when `work` (about the
/// multiply-adds of all chunks) is below [`PARALLEL_MIN_WORK`].
pub(crate) fn for_each_chunk_pair_mut_sized<T: Send, U: Send>(
    work: usize,
    a: &mut [T],
    a_len: usize,
    b: &mut [U],
    b_len: usize,
    f: impl Fn(usize, &mut [T], &mut [U]) + Sync,
) {
    if work >= PARALLEL_MIN_WORK {
        return for_each_chunk_pair_mut(a, a_len, b, b_len, f);
    }
    for (i, (a, b)) in a
        .chunks_mut(a_len.max(1))
        .zip(b.chunks_mut(b_len.max(1)))
        .enumerate()
    {
        f(i, a, b);
    }
}

/// Runs `work(i, chunk_i)` over the chunks of `data` of `chunk_len`, in parallel.
pub(crate) fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    work: impl Fn(usize, &mut [T]) + Sync,
) {
    data.par_chunks_mut(chunk_len.max(1))
        .enumerate()
        .for_each(|(i, chunk)| work(i, chunk));
}

/// Runs `work(state, i, item_i)` over owned `items` (typically disjoint `&mut` chunks of
/// output buffers) with a static schedule: worker `w` of `n` takes
/// items `w, w + n, …` with one state made by `init`; the states come back in worker order,
/// so callers that add them get the same sums on every run.
pub(crate) fn for_each_with_state<I: Send, S: Send>(
    items: Vec<I>,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize, I) + Sync,
) -> Vec<S> {
    let workers = pool_threads().min(items.len()).max(1);
    let mut per_worker: Vec<Vec<(usize, I)>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        per_worker[i % workers].push((i, item));
    }
    let run = |owned: Vec<(usize, I)>| {
        let mut state = None;
        for (i, item) in owned {
            work(state.get_or_insert_with(&init), i, item);
        }
        state
    };
    let states: Vec<Option<S>> = if workers == 1 {
        per_worker.into_iter().map(run).collect()
    } else {
        per_worker.into_par_iter().map(run).collect()
    };
    states.into_iter().flatten().collect()
}
