//! Out-of-distribution and calibration metrics, on the host in f64: AUROC, FPR at a TPR,
//! expected calibration error, negative log-likelihood and the softmax entropy.
//!
//! Convention: a score is higher for inputs that look in-distribution, and in-distribution
//! is the positive class (as `sklearn.metrics.roc_auc_score(y_in, score)` with y = 1 in
//! distribution). Ties count half, as scikit-learn's trapezoidal ROC does.

/// Area under the ROC curve of `positive` (in-distribution) against `negative` scores: the
/// probability that a random positive scores above a random negative, ties counting half
/// (the Mann–Whitney statistic over average ranks). NaN when either side is empty or a
/// score is NaN (scikit-learn refuses NaN input).
pub fn auroc(positive: &[f64], negative: &[f64]) -> f64 {
    if positive.is_empty() || negative.is_empty() || any_nan(positive, negative) {
        return f64::NAN;
    }
    let mut all: Vec<(f64, bool)> = positive
        .iter()
        .map(|&s| (s, true))
        .chain(negative.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of the positives' average ranks (1-based).
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j < all.len() && all[j].0 == all[i].0 {
            j += 1;
        }
        let average_rank = (i + 1 + j) as f64 / 2.0;
        let tied_positives = all[i..j].iter().filter(|e| e.1).count();
        rank_sum += average_rank * tied_positives as f64;
        i = j;
    }
    let (p, n) = (positive.len() as f64, negative.len() as f64);
    (rank_sum - p * (p + 1.0) / 2.0) / (p * n)
}

/// The false-positive rate at the first threshold (from the highest score down) where the
/// true-positive rate reaches `tpr`: the fraction of `negative` scores >= the largest
/// threshold t with `#{positive >= t} >= tpr·#positive`. As
/// `fpr[np.argmax(tpr_curve >= tpr)]` of `sklearn.metrics.roc_curve(…, drop_intermediate=False)`.
/// NaN when either side is empty or a score is NaN.
pub fn fpr_at_tpr(positive: &[f64], negative: &[f64], tpr: f64) -> f64 {
    if positive.is_empty() || negative.is_empty() || any_nan(positive, negative) {
        return f64::NAN;
    }
    let mut pos = positive.to_vec();
    pos.sort_by(|a, b| b.total_cmp(a));
    // Smallest count of positives that reaches the rate (compared as sklearn does, in rates).
    let needed = (1..=pos.len())
        .find(|&k| k as f64 / pos.len() as f64 >= tpr)
        .unwrap_or(pos.len());
    let threshold = pos[needed - 1];
    negative.iter().filter(|&&s| s >= threshold).count() as f64 / negative.len() as f64
}

fn any_nan(positive: &[f64], negative: &[f64]) -> bool {
    positive.iter().chain(negative).any(|s| s.is_nan())
}

/// Expected calibration error over `bins` equal-width confidence bins (lo, hi]:
/// Σ_b |B_b|/N · |accuracy(B_b) − mean confidence(B_b)| (Guo et al. 2017). NaN for no input.
pub fn ece(confidence: &[f64], correct: &[bool], bins: usize) -> f64 {
    let n = confidence.len().min(correct.len());
    if n == 0 || bins == 0 {
        return f64::NAN;
    }
    let mut count = vec![0usize; bins];
    let mut hits = vec![0usize; bins];
    let mut sum = vec![0f64; bins];
    for (&c, &ok) in confidence.iter().zip(correct) {
        // The bin whose (lo, hi] holds c, edges as numpy.linspace(0, 1, bins + 1) computes
        // them: i · (1/bins), the last one 1 (not always i/bins: 3 · 0.1 > 3/10).
        let step = 1.0 / bins as f64;
        let bin = (0..bins - 1)
            .find(|&i| c <= (i + 1) as f64 * step)
            .unwrap_or(bins - 1);
        count[bin] += 1;
        hits[bin] += ok as usize;
        sum[bin] += c;
    }
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| {
            let k = count[b] as f64;
            k / n as f64 * (hits[b] as f64 / k - sum[b] / k).abs()
        })
        .sum()
}

/// Log-softmax of one row of logits (f64, max-shifted): `(l − max) − ln(1 + Σ_rest e^(l_k − max))`
/// with `ln_1p`, so a confident row keeps its small NLL (`l − (max + ln Σ)` rounds
/// `ln(1 + e^−40)` away: the NLL of logits (0, 40) with label 1 came out 0, not 4.2e-18).
/// A NaN logit makes the whole row NaN.
pub fn log_softmax(logits: &[f64]) -> Vec<f64> {
    let Some(top) = argmax(logits) else {
        return Vec::new();
    };
    let max = logits[top];
    let rest: f64 = logits
        .iter()
        .enumerate()
        .filter(|&(k, _)| k != top)
        .map(|(_, &l)| (l - max).exp())
        .sum();
    let log_sum = rest.ln_1p();
    logits.iter().map(|&l| (l - max) - log_sum).collect()
}

/// The largest softmax probability of one row of logits.
pub fn max_softmax(logits: &[f64]) -> f64 {
    let lp = log_softmax(logits);
    match argmax(&lp) {
        Some(k) => lp[k].exp(),
        None => f64::NAN,
    }
}

/// The index of the first largest value, as `numpy.argmax` and Candle's `argmax` give it
/// (a later equal value does not replace it); `None` for an empty row.
pub fn argmax(values: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (k, &v) in values.iter().enumerate() {
        if best.is_none_or(|b| v > values[b]) {
            best = Some(k);
        }
    }
    best
}

/// Entropy −Σ p log p of the softmax of one row of logits (0·log 0 = 0; NaN logits give NaN).
pub fn softmax_entropy(logits: &[f64]) -> f64 {
    log_softmax(logits)
        .iter()
        .map(|&lp| {
            let p = lp.exp();
            if p == 0.0 {
                0.0
            } else {
                -p * lp
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A fixed case with ties inside and across the classes.
    const POSITIVE: [f64; 10] = [0.9, 0.8, 0.8, 0.7, 0.5, 0.5, 0.3, 0.2, 0.95, 0.6];
    const NEGATIVE: [f64; 8] = [0.8, 0.5, 0.4, 0.3, 0.3, 0.1, 0.6, 0.05];

    /// Expected values from scikit-learn 1.9.1:
    /// `y = [1]*10 + [0]*8; s = POSITIVE + NEGATIVE`
    /// `roc_auc_score(y, s)` = 0.75625;
    /// `fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)`,
    /// `fpr[np.argmax(tpr >= t)]` = 0.75, 0.375, 0.125 for t = 0.95, 0.8, 0.5;
    /// `roc_auc_score([1, 1, 0, 0], [0.5]*4)` = 0.5.
    #[test]
    fn auroc_and_fpr_match_scikit_learn_with_ties() {
        assert!((auroc(&POSITIVE, &NEGATIVE) - 0.75625).abs() < 1e-12);
        for (t, expected) in [(0.95, 0.75), (0.8, 0.375), (0.5, 0.125)] {
            assert_eq!(fpr_at_tpr(&POSITIVE, &NEGATIVE, t), expected, "tpr {t}");
        }
        assert_eq!(auroc(&[0.5, 0.5], &[0.5, 0.5]), 0.5);
        // Perfect separation, and its mirror.
        assert_eq!(auroc(&[2.0, 3.0], &[0.0, 1.0]), 1.0);
        assert_eq!(auroc(&[0.0, 1.0], &[2.0, 3.0]), 0.0);
        assert_eq!(fpr_at_tpr(&[2.0, 3.0], &[0.0, 1.0], 0.95), 0.0);
        assert!(auroc(&[], &[1.0]).is_nan());
    }

    /// Expected value from numpy 15-bin ECE (the Guo et al. reference loop):
    /// `b = np.linspace(0, 1, 16)`; for each (lo, hi]: `m = (conf > lo) & (conf <= hi)`;
    /// `e += m.mean() * abs(corr[m].mean() - conf[m].mean())` over non-empty bins
    /// = 0.2333333333333333.
    #[test]
    fn ece_matches_the_numpy_reference() {
        let conf = [
            0.95, 0.91, 0.62, 0.55, 0.99, 0.34, 0.71, 0.71, 0.2, 0.88, 1.0, 0.5,
        ];
        let correct = [1, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1].map(|c| c == 1);
        assert!((ece(&conf, &correct, 15) - 0.2333333333333333).abs() < 1e-12);
        // Closed form: one bin, confidence 0.75, accuracy 1/2 → |0.5 − 0.75| = 0.25.
        assert!((ece(&[0.75, 0.75], &[true, false], 15) - 0.25).abs() < 1e-15);
    }

    /// scikit-learn refuses NaN scores (`roc_auc_score([1, 1, 0], [nan, 1, 0])` raises
    /// "Input contains NaN"); here they give NaN, never a place in the order (the tie loop
    /// of `auroc` made no progress on a NaN and hung; `fpr_at_tpr` ranked it above 1).
    #[test]
    fn nan_scores_give_nan_not_a_rank() {
        let cases: [(&[f64], &[f64]); 3] = [
            (&[f64::NAN, 1.0], &[0.0]),
            (&[1.0, 0.5], &[-f64::NAN, 0.0]),
            (&[1.0, 0.5], &[0.7, f64::NAN]),
        ];
        for (positive, negative) in cases {
            let fpr = fpr_at_tpr(positive, negative, 0.95);
            assert!(fpr.is_nan(), "{positive:?} {negative:?}: FPR {fpr}");
            let area = auroc(positive, negative);
            assert!(area.is_nan(), "{positive:?} {negative:?}: AUROC {area}");
        }
    }

    /// NaN logits give NaN scores, not the most (entropy 0) or least (max-softmax 0)
    /// in-distribution value.
    #[test]
    fn non_finite_logits_give_nan_scores() {
        assert!(softmax_entropy(&[f64::NAN, 0.0]).is_nan());
        assert!(max_softmax(&[f64::NAN, 0.0]).is_nan());
        assert!((max_softmax(&[0.0, 2f64.ln()]) - 2.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn argmax_takes_the_first_maximum_as_numpy_and_candle_do() {
        assert_eq!(argmax(&[0.5, 0.5]), Some(0));
        assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2]), Some(1));
        assert_eq!(argmax(&[-0.0, 0.0]), Some(0));
        assert_eq!(argmax(&[]), None);
    }

    /// Bin edges as `numpy.linspace(0, 1, bins + 1)` computes them, `i · (1/bins)`, which is
    /// not always `i/bins`: for 10 bins the fourth edge is 0.30000000000000004. numpy, with the
    /// loop of `ece_matches_the_numpy_reference` and `np.linspace(0, 1, 11)`, on confidences
    /// (0.30000000000000004, 0.25), correct (1, 0), puts both in (0.2, 0.30000000000000004]:
    /// 0.22499999999999998. (15 bins, the README's, have edges i/15 exactly.)
    #[test]
    fn ece_bin_edges_are_numpys_for_any_bin_count() {
        let e = ece(&[0.30000000000000004, 0.25], &[true, false], 10);
        assert!((e - 0.22499999999999998).abs() < 1e-15, "{e}");
        // A confidence of exactly 1.0 is in the last bin (0.9, 1], with 0.95: |1/2 − 0.975|.
        let e = ece(&[1.0, 0.95], &[true, false], 10);
        assert!((e - 0.475).abs() < 1e-15, "{e}");
    }

    #[test]
    fn entropy_and_log_softmax_closed_forms() {
        // Uniform over 4 classes: entropy ln 4; log-probabilities −ln 4 (shift-invariant).
        assert!((softmax_entropy(&[3.0; 4]) - 4f64.ln()).abs() < 1e-12);
        let lp = log_softmax(&[1000.0, 1000.0]);
        assert!((lp[0] + 2f64.ln()).abs() < 1e-12);
        // A confident row keeps its NLL: −log_softmax((0, 40))[1] = ln(1 + e^−40) = e^−40
        // to within e^−80 (it rounded to 0 before), and that of label 0 is 40 + e^−40.
        let lp = log_softmax(&[0.0, 40.0]);
        assert!((-lp[1] / (-40f64).exp() - 1.0).abs() < 1e-15, "{}", -lp[1]);
        assert_eq!(-lp[0], 40.0);
        // A near one-hot softmax has near-zero entropy.
        assert!(softmax_entropy(&[0.0, 800.0]) < 1e-12);
    }
}
