//! PNG charts: confusion matrix, accuracy and loss curves.

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::eval::Evaluation;
use crate::io::write_atomic;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Renders into an RGB buffer, then encodes and writes the PNG atomically.
fn render_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let mut buf = vec![0u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow!("drawing failed: {e}"))?;
        draw(root.clone())?;
        root.present().map_err(|e| anyhow!("drawing failed: {e}"))?;
    }
    let img = image::RgbImage::from_raw(size.0, size.1, buf)
        .ok_or_else(|| anyhow!("bad image buffer"))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    write_atomic(path, &png)
}

/// The most classes [`confusion_png`] is drawn for (12-pixel cells: 2,400 pixels wide).
pub const CONFUSION_PNG_MAX_CLASSES: usize = 200;

/// Confusion-matrix heat map with counts.
pub fn confusion_png(eval: &Evaluation, path: &Path) -> Result<()> {
    let n = eval.classes.len();
    let cell = (560 / n.max(1)).clamp(12, 60) as u32;
    // Rows are labelled "index name" (the columns carry the index), in full up to 40
    // characters; the left margin fits the longest.
    let labels: Vec<String> = eval
        .classes
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let label = format!("{i} {name}");
            if label.chars().count() > 40 {
                label.chars().take(39).chain(['…']).collect()
            } else {
                label
            }
        })
        .collect();
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0) as u32;
    let (left, top) = ((20 + 7 * longest).max(160), 160u32);
    let size = (left + cell * n as u32 + 40, top + cell * n as u32 + 40);
    render_png(path, size, |root| {
        let title = format!("confusion matrix (accuracy {:.2}%)", eval.accuracy * 100.0);
        root.draw(&Text::new(title, (10, 10), ("sans-serif", 18).into_font()))
            .map_err(|e| anyhow!("{e}"))?;
        let max = eval
            .confusion
            .iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        for (t, row) in eval.confusion.iter().enumerate() {
            for (p, &v) in row.iter().enumerate() {
                let x0 = (left + p as u32 * cell) as i32;
                let y0 = (top + t as u32 * cell) as i32;
                let shade = 1.0 - v as f64 / max;
                let c = RGBColor((255.0 * shade) as u8, (255.0 * shade) as u8, 255);
                root.draw(&Rectangle::new(
                    [(x0, y0), (x0 + cell as i32, y0 + cell as i32)],
                    c.filled(),
                ))
                .map_err(|e| anyhow!("{e}"))?;
                if cell >= 20 {
                    let color = if shade < 0.5 { WHITE } else { BLACK };
                    let style = ("sans-serif", (cell / 3).max(9)).into_font().color(&color);
                    root.draw(&Text::new(
                        v.to_string(),
                        (x0 + 3, y0 + cell as i32 / 3),
                        style,
                    ))
                    .map_err(|e| anyhow!("{e}"))?;
                }
            }
            let y = (top + t as u32 * cell + cell / 3) as i32;
            let label = labels[t].as_str();
            root.draw(&Text::new(label, (10, y), ("sans-serif", 12).into_font()))
                .map_err(|e| anyhow!("{e}"))?;
        }
        root.draw(&Text::new(
            "rows: true class, columns: predicted",
            (10, 40),
            ("sans-serif", 13).into_font(),
        ))
        .map_err(|e| anyhow!("{e}"))?;
        for p in 0..n {
            let x = (left + p as u32 * cell + 2) as i32;
            root.draw(&Text::new(
                p.to_string(),
                (x, top as i32 - 16),
                ("sans-serif", 11).into_font(),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        }
        Ok(())
    })
}

/// One labelled curve: `(epoch, value)` points.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points.
    pub points: Vec<(u32, f64)>,
    /// A shaded band around the line, `(x, low, high)` (the min–max over seeds).
    pub band: Option<Vec<(u32, f64, f64)>>,
}

/// Values spread over more than this factor get a logarithmic axis (a diverged run's loss
/// would otherwise flatten every other curve).
const LOG_AXIS_SPREAD: f64 = 50.0;

/// Line chart of several series over whole epochs, each point marked (a one-epoch run shows
/// as a dot). With `log_if_spread` (losses), positive values spread over more than
/// [`LOG_AXIS_SPREAD`] get a log axis.
pub fn curves_png(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
    log_if_spread: bool,
) -> Result<()> {
    let max_x = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1, u32::max);
    // Epochs 1..=max; one epoch alone is centred, not drawn on the axis.
    let x_range = if max_x == 1 { 0..2 } else { 1..max_x };
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| {
            let band = s.band.iter().flatten().flat_map(|b| [b.1, b.2]);
            s.points.iter().map(|p| p.1).chain(band)
        })
        .filter(|v| v.is_finite())
        .collect();
    let (mut lo, mut hi) = ys
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if ys.is_empty() {
        (lo, hi) = (0.0, 1.0);
    }
    render_png(path, (900, 560), |root| {
        if log_if_spread && lo > 0.0 && hi / lo > LOG_AXIS_SPREAD {
            let range = (lo / 1.2..hi * 1.2).log_scale();
            let y_label = format!("{y_label} (log scale)");
            draw_curves(&root, title, x_range, range, &y_label, series)
        } else {
            // Flat curves get a visible band around their value (around 0: ±1).
            let pad = ((hi - lo) * 0.05).max(hi.abs().max(lo.abs()) * 0.05);
            let pad = if pad > 0.0 { pad } else { 1.0 };
            let range = (lo - pad)..(hi + pad);
            draw_curves(&root, title, x_range, range, y_label, series)
        }
    })
}

/// A y tick: at most 4 decimals, in exponent form outside 0.001..10000 (the default format
/// overflowed the label area for a diverged run's losses).
fn tick_label(v: &f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e4).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn draw_curves<Y>(
    root: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    x_range: std::ops::Range<u32>,
    y_range: Y,
    y_label: &str,
    series: &[Series],
) -> Result<()>
where
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_label)
        .y_label_formatter(&tick_label)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if let Some(band) = &s.band {
            let band: Vec<_> = band
                .iter()
                .filter(|b| b.1.is_finite() && b.2.is_finite())
                .collect();
            let outline: Vec<(u32, f64)> = band
                .iter()
                .map(|b| (b.0, b.2))
                .chain(band.iter().rev().map(|b| (b.0, b.1)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(
                    outline,
                    color.mix(0.2).filled(),
                )))
                .map_err(|e| anyhow!("{e}"))?;
        }
        let points = s.points.iter().copied().filter(|p| p.1.is_finite());
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(3))
            .map_err(|e| anyhow!("{e}"))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pixels of the first series' colour in a chart of `points`.
    fn first_colour_pixels(points: Vec<(u32, f64)>) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let series = [Series {
            label: "run".into(),
            points,
            band: None,
        }];
        curves_png(&path, "t", "y", &series, true).unwrap();
        let c = Palette99::pick(0).to_rgba().rgb();
        let img = image::open(&path).unwrap().to_rgb8();
        img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count()
    }

    #[test]
    fn tick_labels_stay_short() {
        let labels: Vec<String> = [0.0, 0.25, 2.0, 97.5, 1234.5, 2.58e20, 1e-5]
            .iter()
            .map(tick_label)
            .collect();
        assert_eq!(
            labels,
            ["0", "0.25", "2", "97.5", "1234.5", "2.6e20", "1.0e-5"]
        );
    }

    #[test]
    fn a_one_epoch_run_is_drawn_as_a_point() {
        let legend_only = first_colour_pixels(vec![]);
        let one_point = first_colour_pixels(vec![(1, 0.5)]);
        assert!(one_point > legend_only + 10, "{one_point} vs {legend_only}");
    }
}
