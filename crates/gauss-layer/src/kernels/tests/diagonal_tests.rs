use super::*;

#[test]
fn diagonal_fused_matches_oracle_forward_and_backward() -> TestResult {
    let c = case(10, 41, 11, 13, 100.0);
    let mut rng = StdRng::seed_from_u64(110);
    let diagonal = normal(&mut rng, &[13, 11], 1.0).exp()?;
    let fused = diagonal_fused(&c.x, &c.center, &diagonal)?;
    let expected = oracle_diagonal(&c.x, &c.center, &diagonal)?;
    assert!(max_relative_error(&fused, &expected, 1e-3) < 1e-12);

    let fused32 = diagonal_fused(
        &c.x.to_dtype(DType::F32)?,
        &c.center.to_dtype(DType::F32)?,
        &diagonal.to_dtype(DType::F32)?,
    )?;
    assert!(max_relative_error(&fused32, &expected, 1.0) < 1e-5);

    let upstream = normal(&mut rng, &[41, 13], 1.0);
    let inputs = [&c.x, &c.center, &diagonal];
    let fused = gradients(diagonal_fused, inputs, &upstream)?;
    let oracle = gradients(|x, c, p| Ok(oracle_diagonal(x, c, p)?), inputs, &upstream)?;
    for (a, b) in fused.iter().zip(&oracle) {
        assert!(gradient_error(a, b)? < 1e-11);
    }
    Ok(())
}
