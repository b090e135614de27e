//! The probe sweep's figures, as PNG and SVG in `<run dir>/plots/`:
//! - `accuracy_by_epoch`: train and test accuracy per epoch of the configuration chosen on validation (mean over
//!   seeds), Skluzacek's (2022) Figure 3.2;
//! - `loss_by_epoch`: its train and test loss (Figure 3.3);
//! - `configurations`: test AUC and test accuracy of every configuration, pretrained vs random encoder
//!   (mean ± sd over seeds);
//! - `roc`: the test ROC curves of the configuration chosen on validation (every seed, both encoders).
//!
//! Text is drawn with a bundled DejaVu Sans Mono (assets/, Bitstream Vera licence), so the figures need
//! no system fonts or fontconfig.
//!
//! Skluzacek (2022): T. Skluzacek, *An Analysis of Transfer Learning using the SimCLR Contrastive Learning
//! Framework*, University of Minnesota capstone report, 2022.

use std::path::PathBuf;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use simclr_common::probe::{EncoderSource, ProbeOutcome};

use crate::reports::{describe, ConfigKey, Grouped};
use crate::run_dir::RunDir;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (900, 560);
const WIDE: (u32, u32) = (1300, 700);
const SIMCLR: RGBColor = RGBColor(31, 119, 180);
const RANDOM: RGBColor = RGBColor(214, 39, 40);
const TRAIN: RGBColor = RGBColor(44, 160, 44);

type Failure = Box<dyn std::error::Error>;

/// Draws one figure into `<dir>/<name>.png` and `<dir>/<name>.svg`: `$draw` is run with `$area` bound to
/// each backend's drawing area in turn (a macro, as the two backends are different types). Pushes both
/// paths onto `$written`.
macro_rules! png_and_svg {
    ($dir:expr, $name:expr, $size:expr, $written:expr, |$area:ident| $draw:expr) => {{
        for ext in ["png", "svg"] {
            let path = $dir.join(format!("{}.{ext}", $name));
            let result: Result<(), Failure> = if ext == "png" {
                let $area = BitMapBackend::new(&path, $size).into_drawing_area();
                $draw.and_then(|()| $area.present().map_err(Failure::from))
            } else {
                let $area = SVGBackend::new(&path, $size).into_drawing_area();
                $draw.and_then(|()| $area.present().map_err(Failure::from))
            };
            result.map_err(|e| std::io::Error::other(format!("plot {}: {e}", path.display())))?;
            $written.push(path);
        }
    }};
}

fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
                .map_err(|_| "the bundled font cannot be read".to_string())
        })
        .clone()
}

/// Draws every figure as PNG and SVG; returns the files written.
pub fn write_probe_plots(run_dir: &RunDir, outcomes: &[ProbeOutcome]) -> std::io::Result<Vec<PathBuf>> {
    register_font().map_err(std::io::Error::other)?;
    let dir = run_dir.path().join("plots");
    std::fs::create_dir_all(&dir)?;
    let refs: Vec<&ProbeOutcome> = outcomes.iter().collect();
    let grouped = Grouped::new(&refs);
    let Some(best) = grouped.shown() else { return Ok(Vec::new()) };
    let mut written = Vec::new();
    for name in ["accuracy_by_epoch", "loss_by_epoch", "configurations", "roc"] {
        let size = if name == "configurations" { WIDE } else { SIZE };
        png_and_svg!(dir, name, size, written, |area| draw(name, &area, &grouped, best));
    }
    Ok(written)
}

fn draw<DB: DrawingBackend>(
    name: &str,
    area: &DrawingArea<DB, Shift>,
    grouped: &Grouped,
    best: ConfigKey,
) -> Result<(), Failure>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE)?;
    match name {
        "accuracy_by_epoch" => curves(area, grouped, best, true),
        "loss_by_epoch" => curves(area, grouped, best, false),
        "configurations" => {
            let (top, bottom) = area.split_vertically(WIDE.1 / 2);
            configurations(&top, grouped, "test AUC", |o| o.mean_over_classes(|c| c.auc))?;
            configurations(&bottom, grouped, "test accuracy", |o| o.last().map(|p| p.test_accuracy))
        }
        _ => roc(area, grouped, best),
    }
}

/// Per epoch, the mean over seeds of (train, test) of the best SimCLR configuration.
fn curves<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    grouped: &Grouped,
    best: ConfigKey,
    accuracy: bool,
) -> Result<(), Failure>
where
    DB::ErrorType: 'static,
{
    let runs = grouped.runs(best, EncoderSource::Simclr);
    let epochs = runs.iter().map(|o| o.curves.len()).min().unwrap_or(0);
    let mean = |f: &dyn Fn(&simclr_common::probe::EpochPoint) -> f64| -> Vec<(f64, f64)> {
        (0..epochs)
            .map(|e| {
                let v: Vec<f64> = runs.iter().map(|o| f(&o.curves[e])).filter(|v| v.is_finite()).collect();
                ((e + 1) as f64, v.iter().sum::<f64>() / v.len().max(1) as f64)
            })
            .collect()
    };
    let (train, test, what) = if accuracy {
        (mean(&|p| p.train_accuracy), mean(&|p| p.test_accuracy), "accuracy")
    } else {
        (mean(&|p| p.train_loss), mean(&|p| p.test_loss), "loss (binary cross-entropy)")
    };
    let top = if accuracy { 1.0 } else { train.iter().chain(&test).map(|p| p.1).fold(0.0, f64::max) * 1.1 + 1e-6 };
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{what} by epoch: {} (SimCLR encoder, mean of {} seeds)", describe(best), runs.len()),
            (FAMILY, 17),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(1f64..(epochs.max(2) as f64), 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(what)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FAMILY, 13))
        .draw()?;
    for (points, label, color) in [(train, "train", TRAIN), (test, "test", SIMCLR)] {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().label_font((FAMILY, 13)).border_style(BLACK).background_style(WHITE).draw()?;
    Ok(())
}

/// The series' legend box at `position`, in the bundled font at `size` points.
fn legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    size: u32,
) -> Result<(), Failure>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FAMILY, size))
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    Ok(())
}

/// Mean ± sd over seeds of `metric` for every configuration, one series per encoder.
fn configurations<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    grouped: &Grouped,
    what: &str,
    metric: impl Fn(&ProbeOutcome) -> Option<f64>,
) -> Result<(), Failure>
where
    DB::ErrorType: 'static,
{
    let n = grouped.order.len();
    let short = |key: ConfigKey| match key.0 {
        0 => format!("lin/{}{}", key.2, if key.3 { "/ft" } else { "" }),
        h => format!("{h}/{}%/{}{}", f64::from_bits(key.1) * 100.0, key.2, if key.3 { "/ft" } else { "" }),
    };
    // The y range: the data's (mean ± sd of both encoders) rounded out to tenths, so that differences
    // of a few hundredths stay visible.
    let (mut lo, mut hi) = (1.0f64, 0.0f64);
    for &key in &grouped.order {
        for encoder in [EncoderSource::Simclr, EncoderSource::Random] {
            if let Some((m, sd)) = grouped.mean_std(key, encoder, &metric) {
                (lo, hi) = (lo.min(m - sd), hi.max(m + sd));
            }
        }
    }
    let (lo, hi) = if lo <= hi { ((lo * 10.0).floor() / 10.0, (hi * 10.0).ceil() / 10.0) } else { (0.0, 1.0) };
    let (lo, hi) = (lo.clamp(0.0, 0.9), hi.clamp(lo + 0.1, 1.0));
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{what} per configuration (hidden/dropout/epochs), mean ± sd over seeds"), (FAMILY, 15))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), lo..hi)?;
    let order = grouped.order.clone();
    chart
        .configure_mesh()
        .x_labels(n.min(16))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < order.len() {
                short(order[i as usize])
            } else {
                String::new()
            }
        })
        .y_desc(what)
        .label_style((FAMILY, 11))
        .draw()?;
    for (encoder, label, color, offset) in [
        (EncoderSource::Simclr, "SimCLR encoder", SIMCLR, -0.12),
        (EncoderSource::Random, "random encoder", RANDOM, 0.12),
    ] {
        let stats: Vec<(f64, f64, f64)> = grouped
            .order
            .iter()
            .enumerate()
            .filter_map(|(i, &k)| grouped.mean_std(k, encoder, &metric).map(|(m, sd)| (i as f64 + offset, m, sd)))
            .collect();
        if stats.is_empty() {
            continue;
        }
        chart.draw_series(
            stats
                .iter()
                .map(|&(x, m, sd)| PathElement::new(vec![(x, (m - sd).max(0.0)), (x, (m + sd).min(1.0))], color)),
        )?;
        chart
            .draw_series(stats.iter().map(|&(x, m, _)| Circle::new((x, m), 4, color.filled())))?
            .label(label)
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight, 12)
}

/// The first label column's test ROC curve of every seed of the configuration chosen on validation, both encoders.
fn roc<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, grouped: &Grouped, best: ConfigKey) -> Result<(), Failure>
where
    DB::ErrorType: 'static,
{
    let column =
        grouped.runs(best, EncoderSource::Simclr).first().and_then(|o| o.classes.first()).map(|c| c.column.clone());
    let mut chart = ChartBuilder::on(area)
        .caption(format!("test ROC, {}: {}", column.unwrap_or_default(), describe(best)), (FAMILY, 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("false positive rate")
        .y_desc("true positive rate")
        .label_style((FAMILY, 13))
        .draw()?;
    chart.draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))?;
    for (encoder, name, color) in
        [(EncoderSource::Simclr, "SimCLR encoder", SIMCLR), (EncoderSource::Random, "random encoder", RANDOM)]
    {
        let runs = grouped.runs(best, encoder);
        let aucs: Vec<f64> = runs.iter().filter_map(|o| o.classes.first().and_then(|c| c.auc)).collect();
        let mean = aucs.iter().sum::<f64>() / aucs.len().max(1) as f64;
        for (i, o) in runs.iter().enumerate() {
            let Some(class) = o.classes.first() else { continue };
            if class.roc.is_empty() {
                continue;
            }
            let series = chart.draw_series(LineSeries::new(class.roc.clone(), color.stroke_width(2)))?;
            if i == 0 {
                series
                    .label(format!("{name}: {} seeds, mean AUC {mean:.3}", aucs.len()))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
        }
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight, 13)
}

/// `plots/monitor.{png,svg}` from rank 0's `monitor.csv` (epoch, step, knn_auc, knn_accuracy, online_auc,
/// online_accuracy): the monitor's validation AUC and accuracy over the epochs of pretraining. None when
/// there is no table.
pub fn write_monitor_plot(run_dir: &RunDir) -> std::io::Result<Vec<PathBuf>> {
    let path = run_dir.path().join("monitor.csv");
    let mut reader = match csv::Reader::from_path(&path) {
        Ok(r) => r,
        Err(e) if matches!(e.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::NotFound) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(std::io::Error::other(format!("{}: {e}", path.display()))),
    };
    let mut columns: [Vec<(f64, f64)>; 4] = Default::default();
    for record in reader.records() {
        let record = record.map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        let value = |i: usize| record.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
        for (k, column) in columns.iter_mut().enumerate() {
            column.push((value(0), value(2 + k)));
        }
    }
    if columns[0].is_empty() {
        return Ok(Vec::new());
    }
    register_font().map_err(std::io::Error::other)?;
    let dir = run_dir.path().join("plots");
    std::fs::create_dir_all(&dir)?;
    let last = columns[0].iter().map(|p| p.0).fold(1.0, f64::max);
    let [knn_auc, knn_accuracy, online_auc, online_accuracy] = columns;
    let lines = [
        ("kNN: validation AUC", SIMCLR, knn_auc),
        ("kNN: validation accuracy", TRAIN, knn_accuracy),
        ("online linear: validation AUC", RANDOM, online_auc),
        ("online linear: validation accuracy", RGBColor(148, 103, 189), online_accuracy),
    ];
    let mut written = Vec::new();
    png_and_svg!(dir, "monitor", SIZE, written, |area| monitor_lines(&area, last, &lines));
    Ok(written)
}

/// A named, coloured line of (x, y) points.
type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn monitor_lines<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    last_epoch: f64,
    lines: &[Line],
) -> Result<(), Failure>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(area)
        .caption("representation quality during pretraining (validation split)", (FAMILY, 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..last_epoch + 0.5, 0f64..1f64)?;
    chart.configure_mesh().x_desc("epoch").y_desc("").label_style((FAMILY, 13)).draw()?;
    for (name, color, points) in lines {
        let color = *color;
        let points: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(move |p| Circle::new(p, 4, color.filled())))?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight, 13)
}

/// One coloured group of points in a scatter plot.
pub struct ScatterGroup {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// Draws `groups` as a scatter plot into `<run dir>/plots/NAME.{png,svg}`; returns the files written.
pub fn write_scatter(
    run_dir: &RunDir,
    name: &str,
    caption: &str,
    axes: (&str, &str),
    groups: &[ScatterGroup],
) -> std::io::Result<Vec<PathBuf>> {
    register_font().map_err(std::io::Error::other)?;
    let dir = run_dir.path().join("plots");
    std::fs::create_dir_all(&dir)?;
    let all = || groups.iter().flat_map(|g| g.points.iter());
    let range = |f: fn(&(f64, f64)) -> f64| {
        let (lo, hi) =
            all().map(f).filter(|v| v.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
        if lo > hi {
            (-1.0, 1.0)
        } else {
            let pad = ((hi - lo) * 0.05).max(1e-6);
            (lo - pad, hi + pad)
        }
    };
    let (x, y) = (range(|p| p.0), range(|p| p.1));
    let mut written = Vec::new();
    png_and_svg!(dir, name, SIZE, written, |area| scatter(&area, caption, axes, x, y, groups));
    Ok(written)
}

fn scatter<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    axes: (&str, &str),
    x: (f64, f64),
    y: (f64, f64),
    groups: &[ScatterGroup],
) -> Result<(), Failure>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)?;
    chart.configure_mesh().x_desc(axes.0).y_desc(axes.1).label_style((FAMILY, 13)).draw()?;
    for g in groups {
        let color = g.color;
        chart
            .draw_series(
                g.points
                    .iter()
                    .filter(|p| p.0.is_finite() && p.1.is_finite())
                    .map(move |&p| Circle::new(p, 3, color.mix(0.6).filled())),
            )?
            .label(format!("{} ({})", g.label, g.points.len()))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight, 13)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reports::tests::outcome;
    use simclr_common::probe::ProbeTask;

    /// Every figure is written in both formats: a PNG that starts with the PNG signature and has the
    /// size asked for, an SVG whose text carries the legend (so the bundled font was used for layout).
    #[test]
    fn every_figure_is_written_as_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = RunDir::create(dir.path()).unwrap();
        let task = |id, hidden, encoder, seed| ProbeTask {
            id,
            encoder,
            hidden,
            dropout: 0.0,
            epochs: 5,
            seed,
            finetune: false,
        };
        let outcomes = vec![
            outcome(task(0, 0, EncoderSource::Simclr, 0), 0.6),
            outcome(task(1, 0, EncoderSource::Simclr, 1), 0.65),
            outcome(task(2, 100, EncoderSource::Simclr, 0), 0.7),
            outcome(task(3, 0, EncoderSource::Random, 0), 0.75),
        ];
        let written = write_probe_plots(&run_dir, &outcomes).unwrap();
        assert_eq!(written.len(), 8);
        for path in &written {
            let bytes = std::fs::read(path).unwrap();
            if path.extension().is_some_and(|e| e == "png") {
                assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
                let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
                assert!(width == SIZE.0 || width == WIDE.0, "{}: width {width}", path.display());
            } else {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.starts_with("<svg"), "{}", path.display());
                assert!(text.contains("SimCLR encoder") || text.contains("train"), "{}", path.display());
            }
        }
        // Nothing to plot without a SimCLR result: no files, no error.
        let random_only = vec![outcome(task(0, 0, EncoderSource::Random, 0), 0.7)];
        assert!(write_probe_plots(&run_dir, &random_only).unwrap().is_empty());
    }
}
