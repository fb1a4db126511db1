//! Image transforms with torchvision's semantics: RandomRotation, GaussianBlur, ColorJitter,
//! RandomHorizontalFlip, RandomResizedCrop, Resize (bilinear, antialiased) and Normalize.
//!
//! Images are RGB, `f32` in `[0, 1]`, interleaved HWC while transforming; the output is the
//! normalized CHW array a model takes.

use std::path::Path;

use anyhow::{Context, Result, bail};
use fast_image_resize::images::TypedImage;
use fast_image_resize::pixels::F32x3;
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// An RGB image, `f32` samples in `[0, 1]`, row-major interleaved (HWC).
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` samples.
    pub data: Vec<f32>,
}

impl RgbImage {
    /// A constant-colour image.
    pub fn filled(width: usize, height: usize, rgb: [f32; 3]) -> Self {
        let data = (0..width * height).flat_map(|_| rgb).collect();
        Self {
            width,
            height,
            data,
        }
    }

    fn from_rgb8(img: &image::RgbImage) -> Self {
        let data = img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
        Self {
            width: img.width() as usize,
            height: img.height() as usize,
            data,
        }
    }
}

/// Decodes an image file (PNG/JPEG/BMP/WebP; grayscale, RGBA and 16-bit become RGB).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open image {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "image {} is not a regular file (a device, FIFO or socket, or a link to one): remove it",
            path.display()
        );
    }
    if meta.len() == 0 {
        bail!(
            "image {} is an empty (0-byte) file: remove or replace it",
            path.display()
        );
    }
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let decoded = reader.decode().map_err(|e| {
        anyhow::anyhow!(
            "cannot decode image {}: {e} (remove or replace the file)",
            path.display()
        )
    })?;
    if decoded.width() == 0 || decoded.height() == 0 {
        bail!("image {} is empty (0 pixels): remove it", path.display());
    }
    Ok(RgbImage::from_rgb8(&decoded.to_rgb8()))
}

/// Random augmentations of the training pipeline. A zero disables an operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// RandomRotation(degrees): angle uniform in `[-d, d]`, nearest neighbour, fill 0.
    pub rotation_degrees: f32,
    /// GaussianBlur kernel size (odd; 0 disables).
    pub blur_kernel: usize,
    /// GaussianBlur sigma range, sampled uniformly per image.
    pub blur_sigma: [f32; 2],
    /// ColorJitter brightness.
    pub brightness: f32,
    /// ColorJitter contrast.
    pub contrast: f32,
    /// ColorJitter saturation.
    pub saturation: f32,
    /// ColorJitter hue (at most 0.5).
    pub hue: f32,
    /// RandomHorizontalFlip with probability 0.5.
    pub hflip: bool,
    /// RandomResizedCrop instead of Resize (scale range below, ratio 3/4..4/3).
    pub random_resized_crop: bool,
    /// RandomResizedCrop area scale range.
    pub crop_scale: [f32; 2],
}

impl Default for AugmentConfig {
    /// The tutorial's training augmentation.
    fn default() -> Self {
        Self {
            rotation_degrees: 10.0,
            blur_kernel: 5,
            blur_sigma: [0.1, 3.0],
            brightness: 0.5,
            contrast: 0.5,
            saturation: 0.5,
            hue: 0.0,
            hflip: false,
            random_resized_crop: false,
            crop_scale: [0.08, 1.0],
        }
    }
}

impl AugmentConfig {
    /// No augmentation at all (the validation pipeline).
    pub fn none() -> Self {
        Self {
            rotation_degrees: 0.0,
            blur_kernel: 0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
            ..Self::default()
        }
    }

    /// Whether any operation is random (so outputs differ between epochs).
    pub fn is_random(&self) -> bool {
        self.rotation_degrees != 0.0
            || self.blur_kernel > 0
            || self.brightness != 0.0
            || self.contrast != 0.0
            || self.saturation != 0.0
            || self.hue != 0.0
            || self.hflip
            || self.random_resized_crop
    }

    /// Validates the values, with an error that names the key.
    pub fn validate(&self) -> Result<()> {
        if self.blur_kernel > 0 && self.blur_kernel.is_multiple_of(2) {
            bail!(
                "blur_kernel {} must be odd (e.g. 5) or 0 to disable",
                self.blur_kernel
            );
        }
        // torchvision's reflect padding needs kernel/2 < the image side.
        let largest = 2 * super::MAX_IMAGE_SIZE - 1;
        if self.blur_kernel > largest {
            bail!(
                "blur_kernel {} is larger than any image kd handles: use at most {largest} (the recipe uses 5)",
                self.blur_kernel
            );
        }
        let [lo, hi] = self.blur_sigma;
        if self.blur_kernel > 0 && !(lo > 0.0 && hi >= lo && hi.is_finite()) {
            bail!(
                "blur_sigma {:?} must be a positive range, e.g. [0.1, 3.0]",
                self.blur_sigma
            );
        }
        for (name, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
            ("rotation_degrees", self.rotation_degrees),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("{name} {v} must be a non-negative number");
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            bail!("hue {} must be in [0, 0.5]", self.hue);
        }
        let [a, b] = self.crop_scale;
        if self.random_resized_crop && !(a > 0.0 && a <= b && b <= 1.0) {
            bail!(
                "crop_scale {:?} must satisfy 0 < min <= max <= 1",
                self.crop_scale
            );
        }
        Ok(())
    }
}

/// RandomRotation by `degrees` (counter-clockwise) about the centre, nearest neighbour, fill 0.
pub fn rotate(img: &RgbImage, degrees: f32) -> RgbImage {
    let (w, h) = (img.width, img.height);
    // In image coordinates (y down) this inverse map turns the picture counter-clockwise
    // for a positive angle, as torchvision's and PIL's `rotate` do.
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (cx, cy) = ((w as f32 - 1.0) * 0.5, (h as f32 - 1.0) * 0.5);
    let mut out = vec![0.0; img.data.len()];
    for y in 0..h {
        let dy = y as f32 - cy;
        for x in 0..w {
            let dx = x as f32 - cx;
            // Inverse mapping: the source pixel that lands on (x, y).
            let sx = (cos * dx - sin * dy + cx).round();
            let sy = (sin * dx + cos * dy + cy).round();
            if sx >= 0.0 && sy >= 0.0 && (sx as usize) < w && (sy as usize) < h {
                let s = (sy as usize * w + sx as usize) * 3;
                let d = (y * w + x) * 3;
                out[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
            }
        }
    }
    RgbImage {
        width: w,
        height: h,
        data: out,
    }
}

/// torchvision's 1-D Gaussian kernel: `exp(-x^2 / 2 sigma^2)` over `[-(k-1)/2, (k-1)/2]`, normalized.
pub fn gaussian_kernel(size: usize, sigma: f32) -> Vec<f32> {
    let half = (size as f32 - 1.0) * 0.5;
    let k: Vec<f32> = (0..size)
        .map(|i| {
            let x = i as f32 - half;
            (-0.5 * (x / sigma).powi(2)).exp()
        })
        .collect();
    let sum: f32 = k.iter().sum();
    k.into_iter().map(|v| v / sum).collect()
}

/// Reflect-pads an index into `0..n` (PyTorch's "reflect": no edge repeat).
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let mut i = i.rem_euclid(period);
    if i >= n {
        i = period - i;
    }
    i as usize
}

/// GaussianBlur with a separable kernel and reflect padding.
pub fn gaussian_blur(img: &RgbImage, kernel_size: usize, sigma: f32) -> RgbImage {
    let k = gaussian_kernel(kernel_size, sigma);
    let (w, h) = (img.width, img.height);
    let rows = blur_pass(&img.data, w, h, &k, true);
    RgbImage {
        width: w,
        height: h,
        data: blur_pass(&rows, w, h, &k, false),
    }
}

/// One 1-D convolution pass of an HWC image along x (`horizontal`) or y.
fn blur_pass(src: &[f32], w: usize, h: usize, k: &[f32], horizontal: bool) -> Vec<f32> {
    let r = (k.len() / 2) as isize;
    let mut out = vec![0.0; src.len()];
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0.0f32; 3];
            for (j, kv) in k.iter().enumerate() {
                let offset = j as isize - r;
                let s = if horizontal {
                    y * w + reflect(x as isize + offset, w)
                } else {
                    reflect(y as isize + offset, h) * w + x
                } * 3;
                for (a, v) in acc.iter_mut().zip(&src[s..s + 3]) {
                    *a += kv * v;
                }
            }
            out[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&acc);
        }
    }
    out
}

fn gray(p: &[f32]) -> f32 {
    0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

/// Brightness: blend with black.
pub fn adjust_brightness(img: &mut RgbImage, factor: f32) {
    img.data
        .iter_mut()
        .for_each(|v| *v = (*v * factor).clamp(0.0, 1.0));
}

/// Contrast: blend with the mean grey level of the image.
pub fn adjust_contrast(img: &mut RgbImage, factor: f32) {
    let n = (img.width * img.height) as f32;
    let mean = img.data.chunks_exact(3).map(gray).sum::<f32>() / n;
    img.data
        .iter_mut()
        .for_each(|v| *v = (factor * *v + (1.0 - factor) * mean).clamp(0.0, 1.0));
}

/// Saturation: blend each pixel with its grey level.
pub fn adjust_saturation(img: &mut RgbImage, factor: f32) {
    for p in img.data.chunks_exact_mut(3) {
        let g = gray(p);
        p.iter_mut()
            .for_each(|v| *v = (factor * *v + (1.0 - factor) * g).clamp(0.0, 1.0));
    }
}

/// Hue: rotate the hue by `shift` turns (in `[-0.5, 0.5]`) in HSV space.
pub fn adjust_hue(img: &mut RgbImage, shift: f32) {
    for p in img.data.chunks_exact_mut(3) {
        let (r, g, b) = (p[0], p[1], p[2]);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        if delta <= 0.0 {
            continue;
        }
        let h = if max == r {
            ((g - b) / delta).rem_euclid(6.0)
        } else if max == g {
            (b - r) / delta + 2.0
        } else {
            (r - g) / delta + 4.0
        } / 6.0;
        let h = (h + shift).rem_euclid(1.0) * 6.0;
        let (s, v) = (delta / max, max);
        let i = h.floor();
        let f = h - i;
        let (pp, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
        let rgb = match i as i32 % 6 {
            0 => [v, t, pp],
            1 => [q, v, pp],
            2 => [pp, v, t],
            3 => [pp, q, v],
            4 => [t, pp, v],
            _ => [v, pp, q],
        };
        p.copy_from_slice(&rgb);
    }
}

/// Mirrors the image left to right.
pub fn hflip(img: &mut RgbImage) {
    let w = img.width;
    for row in img.data.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

/// Bilinear, antialiased resize (PIL's filter) of the crop `(left, top, width, height)`.
pub fn resize_crop(img: &RgbImage, crop: Option<[f64; 4]>, out_w: usize, out_h: usize) -> RgbImage {
    if crop.is_none() && img.width == out_w && img.height == out_h {
        return img.clone();
    }
    let pixels: Vec<F32x3> = img
        .data
        .chunks_exact(3)
        .map(|p| F32x3::new([p[0], p[1], p[2]]))
        .collect();
    let src = TypedImage::from_pixels(img.width as u32, img.height as u32, pixels)
        .expect("pixel count matches the image size");
    let mut dst = TypedImage::<F32x3>::new(out_w as u32, out_h as u32);
    let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    if let Some([l, t, w, h]) = crop {
        options = options.crop(l, t, w, h);
    }
    Resizer::new()
        .resize_typed(&src, &mut dst, &options)
        .expect("resize of a non-empty image");
    let data = dst.pixels().iter().flat_map(|p| p.0).collect();
    RgbImage {
        width: out_w,
        height: out_h,
        data,
    }
}

/// Samples a RandomResizedCrop box `(left, top, width, height)` like torchvision.
fn random_crop_box(rng: &mut impl Rng, w: usize, h: usize, scale: [f32; 2]) -> [f64; 4] {
    let area = (w * h) as f64;
    let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0] as f64..=scale[1] as f64);
        let ratio = rng.random_range(lr0..=lr1).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw >= 1.0 && ch >= 1.0 && cw <= w as f64 && ch <= h as f64 {
            let top = rng.random_range(0..=(h - ch as usize)) as f64;
            let left = rng.random_range(0..=(w - cw as usize)) as f64;
            return [left, top, cw, ch];
        }
    }
    // Fallback: central crop at the clamped aspect ratio.
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < 3.0 / 4.0 {
        (w as f64, (w as f64 / (3.0 / 4.0)).round())
    } else if in_ratio > 4.0 / 3.0 {
        ((h as f64 * 4.0 / 3.0).round(), h as f64)
    } else {
        (w as f64, h as f64)
    };
    [
        ((w as f64 - cw) / 2.0).floor(),
        ((h as f64 - ch) / 2.0).floor(),
        cw,
        ch,
    ]
}

/// Per-channel normalization `(x - mean) / std`, written as CHW.
pub fn normalize_to_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = img.width * img.height;
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] - mean[c]) / std[c];
        }
    }
}

/// Inverse of [`normalize_to_chw`] (for tests and visualisation).
pub fn denormalize_chw(
    chw: &[f32],
    width: usize,
    height: usize,
    mean: [f32; 3],
    std: [f32; 3],
) -> RgbImage {
    let plane = width * height;
    let data = (0..plane)
        .flat_map(|i| (0..3).map(move |c| chw[c * plane + i] * std[c] + mean[c]))
        .collect();
    RgbImage {
        width,
        height,
        data,
    }
}

/// The full transform: optional random augmentation, resize to `size`, normalize.
#[derive(Debug, Clone)]
pub struct Transform {
    /// Random augmentation (training) or `None` (validation, inference).
    pub augment: Option<AugmentConfig>,
    /// Output `(height, width)`.
    pub size: (usize, usize),
    /// Normalization mean per channel.
    pub mean: [f32; 3],
    /// Normalization std per channel.
    pub std: [f32; 3],
}

impl Transform {
    /// Applies the transform, writing `3 * h * w` normalized CHW values into `out`.
    pub fn apply(&self, img: RgbImage, rng: &mut impl Rng, out: &mut [f32]) {
        let (h, w) = self.size;
        let mut img = img;
        let mut crop = None;
        if let Some(a) = self.augment.as_ref().filter(|a| a.is_random()) {
            if a.random_resized_crop {
                crop = Some(random_crop_box(rng, img.width, img.height, a.crop_scale));
            }
            if a.rotation_degrees > 0.0 {
                let angle = rng.random_range(-a.rotation_degrees..=a.rotation_degrees);
                img = rotate(&img, angle);
            }
            if a.blur_kernel > 0 {
                let sigma = rng.random_range(a.blur_sigma[0]..=a.blur_sigma[1]);
                img = gaussian_blur(&img, a.blur_kernel, sigma);
            }
            jitter(&mut img, a, rng);
            if a.hflip && rng.random_bool(0.5) {
                hflip(&mut img);
            }
        }
        let img = resize_crop(&img, crop, w, h);
        normalize_to_chw(&img, self.mean, self.std, out);
    }
}

/// ColorJitter: the enabled adjustments in a random order, factors like torchvision's.
fn jitter(img: &mut RgbImage, a: &AugmentConfig, rng: &mut impl Rng) {
    let mut order = [0usize, 1, 2, 3];
    order.shuffle(rng);
    for op in order {
        match op {
            0 if a.brightness > 0.0 => {
                let f = rng.random_range((1.0 - a.brightness).max(0.0)..=1.0 + a.brightness);
                adjust_brightness(img, f);
            }
            1 if a.contrast > 0.0 => {
                let f = rng.random_range((1.0 - a.contrast).max(0.0)..=1.0 + a.contrast);
                adjust_contrast(img, f);
            }
            2 if a.saturation > 0.0 => {
                let f = rng.random_range((1.0 - a.saturation).max(0.0)..=1.0 + a.saturation);
                adjust_saturation(img, f);
            }
            3 if a.hue > 0.0 => {
                let f = rng.random_range(-a.hue..=a.hue);
                adjust_hue(img, f);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn gradient(w: usize, h: usize) -> RgbImage {
        let data = (0..w * h)
            .flat_map(|i| {
                let v = i as f32 / (w * h) as f32;
                [v, 1.0 - v, (v * 7.0).fract()]
            })
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn output_has_requested_size() {
        let t = Transform {
            augment: Some(AugmentConfig::default()),
            size: (24, 16),
            mean: [0.5; 3],
            std: [0.25; 3],
        };
        let mut out = vec![f32::NAN; 3 * 24 * 16];
        t.apply(
            gradient(50, 37),
            &mut ChaCha8Rng::seed_from_u64(1),
            &mut out,
        );
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn blur_of_constant_image_is_that_constant() {
        let img = RgbImage::filled(13, 9, [0.2, 0.5, 0.9]);
        for sigma in [0.1, 1.0, 3.0] {
            let b = gaussian_blur(&img, 5, sigma);
            for (a, b) in img.data.iter().zip(&b.data) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn blur_kernel_matches_torchvision() {
        // torchvision _get_gaussian_kernel1d(5, 1.0)
        let k = gaussian_kernel(5, 1.0);
        let expected = [0.05448869, 0.24420135, 0.40261996, 0.24420135, 0.05448869];
        for (a, b) in k.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn blur_actually_smooths() {
        let img = gradient(16, 16);
        let b = gaussian_blur(&img, 5, 2.0);
        let var = |d: &[f32]| {
            let m = d.iter().sum::<f32>() / d.len() as f32;
            d.iter().map(|v| (v - m).powi(2)).sum::<f32>()
        };
        assert!(var(&b.data) < var(&img.data));
    }

    #[test]
    fn rotation_by_zero_is_identity_and_by_180_reverses() {
        let img = gradient(9, 7);
        assert_eq!(rotate(&img, 0.0), img);
        let r = rotate(&img, 180.0);
        let (w, h) = (9, 7);
        for y in 0..h {
            for x in 0..w {
                let a = &img.data[(y * w + x) * 3..(y * w + x) * 3 + 3];
                let b = &r.data[((h - 1 - y) * w + (w - 1 - x)) * 3..][..3];
                assert_eq!(a, b);
            }
        }
    }

    /// torchvision turns a positive angle counter-clockwise: the right edge's middle goes
    /// to the top edge's middle, and the top's to the left.
    #[test]
    fn positive_rotation_is_counter_clockwise() {
        let (w, h) = (7, 7);
        let mut img = RgbImage {
            width: w,
            height: h,
            data: vec![0.0; w * h * 3],
        };
        let pixel = |x: usize, y: usize| (y * w + x) * 3;
        img.data[pixel(6, 3)] = 1.0; // right, red
        img.data[pixel(3, 0) + 1] = 1.0; // top, green
        let r = rotate(&img, 90.0);
        assert_eq!(&r.data[pixel(3, 0)..][..3], &[1.0, 0.0, 0.0]);
        assert_eq!(&r.data[pixel(0, 3)..][..3], &[0.0, 1.0, 0.0]);
        assert_eq!(r.data.iter().sum::<f32>(), 2.0, "nothing else lit");
    }

    #[test]
    fn normalize_then_denormalize_round_trips() {
        let img = gradient(8, 5);
        let (mean, std) = ([0.4413, 0.4712, 0.4371], [0.1851, 0.1805, 0.1678]);
        let mut chw = vec![0.0; 3 * 8 * 5];
        normalize_to_chw(&img, mean, std, &mut chw);
        let back = denormalize_chw(&chw, 8, 5, mean, std);
        for (a, b) in img.data.iter().zip(&back.data) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn resize_of_constant_image_stays_constant() {
        let img = RgbImage::filled(40, 30, [0.1, 0.6, 0.3]);
        let r = resize_crop(&img, None, 7, 11);
        assert_eq!((r.width, r.height), (7, 11));
        for p in r.data.chunks_exact(3) {
            assert!((p[0] - 0.1).abs() < 1e-5 && (p[1] - 0.6).abs() < 1e-5);
        }
    }

    #[test]
    fn jitter_factors_of_one_change_nothing() {
        let img = gradient(6, 6);
        let mut j = img.clone();
        adjust_brightness(&mut j, 1.0);
        adjust_contrast(&mut j, 1.0);
        adjust_saturation(&mut j, 1.0);
        adjust_hue(&mut j, 0.0);
        for (a, b) in img.data.iter().zip(&j.data) {
            assert!((a - b).abs() < 1e-5);
        }
        let mut dark = img.clone();
        adjust_brightness(&mut dark, 0.0);
        assert!(dark.data.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn hflip_twice_is_identity() {
        let img = gradient(5, 3);
        let mut f = img.clone();
        hflip(&mut f);
        assert_ne!(f, img);
        hflip(&mut f);
        assert_eq!(f, img);
    }
}
