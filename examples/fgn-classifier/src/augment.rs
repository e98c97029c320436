//! Training-time data augmentation of the CNN's mini-batches: each image translated by a
//! random whole-pixel offset (zero fill), and/or, for image sets where mirror images belong
//! to the same class (FashionMNIST, not digits), mirrored left–right with probability ½. Done
//! on the host before the batch moves to the device; seeded by the run's generator.

use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;

/// Largest translation, in pixels, along each axis.
pub const MAX_SHIFT: usize = 2;

/// Which random transformations training images get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    /// The images as they are.
    #[default]
    None,
    /// Mirrored left–right half the time (not for digits or letters).
    Flip,
    /// Translated by up to ±2 pixels along each axis.
    Shift,
    /// Translated, and mirrored left–right half the time (not for digits or letters).
    ShiftFlip,
}

/// Transforms each row-major `height × width` image of `images` in place (a remainder
/// shorter than one image is left as is).
pub fn apply(images: &mut [f32], height: usize, width: usize, augment: Augment, rng: &mut StdRng) {
    if augment == Augment::None || height * width == 0 {
        return;
    }
    let max = MAX_SHIFT as i64;
    let mut source = vec![0.0; height * width];
    for image in images.chunks_exact_mut(height * width) {
        source.copy_from_slice(image);
        let (dy, dx) = if augment == Augment::Flip {
            (0, 0)
        } else {
            (
                rng.random_range(-max..=max) as isize,
                rng.random_range(-max..=max) as isize,
            )
        };
        let flip = matches!(augment, Augment::Flip | Augment::ShiftFlip) && rng.random_bool(0.5);
        transform(&source, image, (height, width), (dy, dx), flip);
    }
}

/// `out[y][x] = source[y − dy][x' − dx]` with x' = x or mirrored, 0 outside the image.
fn transform(
    source: &[f32],
    out: &mut [f32],
    (height, width): (usize, usize),
    (dy, dx): (isize, isize),
    flip: bool,
) {
    for y in 0..height {
        for x in 0..width {
            let sy = y as isize - dy;
            let sx = x as isize - dx;
            let inside = (0..height as isize).contains(&sy) && (0..width as isize).contains(&sx);
            out[y * width + x] = if inside {
                let sx = sx as usize;
                let sx = if flip { width - 1 - sx } else { sx };
                source[sy as usize * width + sx]
            } else {
                0.0
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_shift_moves_every_pixel_by_the_offset() {
        // 3×4 image with distinct values; shift down 1, left 2.
        let source: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        let mut out = vec![f32::NAN; 12];
        transform(&source, &mut out, (3, 4), (1, -2), false);
        #[rustfmt::skip]
        let expected = [
            0.0, 0.0, 0.0, 0.0,
            3.0, 4.0, 0.0, 0.0,
            7.0, 8.0, 0.0, 0.0,
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn a_flip_mirrors_each_row() {
        let source: Vec<f32> = (1..=6).map(|v| v as f32).collect();
        let mut out = vec![f32::NAN; 6];
        transform(&source, &mut out, (2, 3), (0, 0), true);
        assert_eq!(out, [3.0, 2.0, 1.0, 6.0, 5.0, 4.0]);
    }

    #[test]
    fn augmentation_is_seeded_and_stays_in_bounds() {
        let images: Vec<f32> = (0..5 * 36).map(|v| (v % 7) as f32).collect();
        let run = |augment| {
            let mut rng = StdRng::seed_from_u64(11);
            let mut out = images.clone();
            apply(&mut out, 6, 6, augment, &mut rng);
            out
        };
        assert_eq!(run(Augment::None), images);
        // A flip keeps every row's values, some rows reversed.
        let flipped = run(Augment::Flip);
        assert_ne!(flipped, images);
        for (a, b) in flipped.chunks(6).zip(images.chunks(6)) {
            let reversed: Vec<f32> = b.iter().rev().copied().collect();
            assert!(a == b || a == reversed.as_slice());
        }
        let shifted = run(Augment::ShiftFlip);
        assert_eq!(shifted, run(Augment::ShiftFlip), "same seed, same batch");
        assert_ne!(shifted, images);
        // Translation only moves pixels (or drops them at the border): never new values.
        assert!(shifted
            .iter()
            .all(|v| (0.0..7.0).contains(v) && v.fract() == 0.0));
        let total = |v: &[f32]| v.iter().sum::<f32>();
        assert!(total(&shifted) <= total(&images));
    }
}
