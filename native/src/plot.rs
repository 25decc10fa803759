//! Dice vs prompt, one panel per dataset and a line per model (the study's Figure 2), as PNG
//! and SVG with plotters. Text needs a TrueType font: `VLSM_FONT`, else a common system one.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::report::Report;
use crate::report::thresholds::Study;

const PANEL: (u32, u32) = (420, 300);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
];

/// Writes `dice_vs_prompt.png` and `.svg` into `out`; returns their paths.
pub fn dice_vs_prompt(report: &Report, out: &Path) -> Result<Vec<PathBuf>> {
    if report.datasets.is_empty() || report.prompts.is_empty() {
        return Ok(Vec::new());
    }
    load_font()?;
    let columns = report.datasets.len().min(3);
    let rows = report.datasets.len().div_ceil(columns);
    let size = (PANEL.0 * columns as u32, PANEL.1 * rows as u32 + 40);
    render(
        &DiceVsPrompt {
            report,
            rows,
            columns,
        },
        size,
        out,
        "dice_vs_prompt",
    )
}

/// Writes `dice_vs_threshold.png` and `.svg` into `out` (one panel per dataset, a line per
/// model); returns their paths.
pub fn dice_vs_threshold(study: &Study, out: &Path) -> Result<Vec<PathBuf>> {
    let mut datasets: Vec<&str> = Vec::new();
    for c in &study.curves {
        if !datasets.contains(&c.dataset.as_str()) {
            datasets.push(&c.dataset);
        }
    }
    if datasets.is_empty() {
        return Ok(Vec::new());
    }
    load_font()?;
    let columns = datasets.len().min(3);
    let rows = datasets.len().div_ceil(columns);
    let size = (PANEL.0 * columns as u32, PANEL.1 * rows as u32 + 40);
    render(
        &DiceVsThreshold {
            study,
            datasets,
            rows,
            columns,
        },
        size,
        out,
        "dice_vs_threshold",
    )
}

struct DiceVsThreshold<'a> {
    study: &'a Study,
    datasets: Vec<&'a str>,
    rows: usize,
    columns: usize,
}

impl Figure for DiceVsThreshold<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e:?}");
        root.fill(&WHITE).map_err(fail)?;
        let root = root
            .titled("Dice (%) vs threshold", ("sans-serif", 22))
            .map_err(fail)?;
        let panels = root.split_evenly((self.rows, self.columns));
        let mut models: Vec<&str> = Vec::new();
        for c in &self.study.curves {
            if !models.contains(&c.model.as_str()) {
                models.push(&c.model);
            }
        }
        for (index, (dataset, panel)) in self.datasets.iter().zip(&panels).enumerate() {
            let mut chart = ChartBuilder::on(panel)
                .caption(*dataset, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(36)
                .build_cartesian_2d(0f64..1f64, 0f64..100f64)
                .map_err(fail)?;
            chart
                .configure_mesh()
                .x_labels(6)
                .y_labels(6)
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(fail)?;
            for curve in self.study.curves.iter().filter(|c| c.dataset == *dataset) {
                let m = models.iter().position(|m| *m == curve.model).unwrap_or(0);
                let color = COLORS[m % COLORS.len()];
                let points: Vec<(f64, f64)> = curve
                    .thresholds
                    .iter()
                    .zip(&curve.dice)
                    .filter(|(_, d)| !d.is_nan())
                    .map(|(&t, &d)| (f64::from(t), d * 100.0))
                    .collect();
                draw_line(&mut chart, points.clone(), color, &curve.model)?;
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(fail)?;
            }
            if index == 0 {
                draw_legend(&mut chart)?;
            }
        }
        Ok(())
    }
}

/// Something drawn on any plotters backend (so once for the SVG, once for the PNG).
trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;
}

/// Writes `{stem}.png` and `{stem}.svg` of `figure` into `out`; returns their paths.
fn render(figure: &impl Figure, size: (u32, u32), out: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        figure.draw(&root)?;
        root.present()
            .map_err(|e| anyhow!("drawing the SVG plot: {e}"))?;
    }
    let svg_path = out.join(format!("{stem}.svg"));
    crate::segment::write_atomic(&svg_path, svg.as_bytes())?;
    let mut pixels = vec![0u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        figure.draw(&root)?;
        root.present()
            .map_err(|e| anyhow!("drawing the PNG plot: {e}"))?;
    }
    let image = image::RgbImage::from_raw(size.0, size.1, pixels).context("plot buffer size")?;
    let png_path = out.join(format!("{stem}.png"));
    crate::segment::write_atomic(&png_path, &vlsm::render::encode_png(&image)?)?;
    Ok(vec![png_path, svg_path])
}

/// A line series with its legend entry.
fn draw_line<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    label: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))
        .map_err(|e| anyhow!("drawing the plot: {e:?}"))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    Ok(())
}

fn draw_legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| anyhow!("drawing the plot: {e:?}"))
}

struct DiceVsPrompt<'a> {
    report: &'a Report,
    rows: usize,
    columns: usize,
}

impl Figure for DiceVsPrompt<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        draw(self.report, root, self.rows, self.columns)
    }
}

fn draw<DB: DrawingBackend>(
    report: &Report,
    root: &DrawingArea<DB, Shift>,
    rows: usize,
    columns: usize,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e:?}");
    root.fill(&WHITE).map_err(fail)?;
    let title = format!(
        "Dice (%) vs prompt, {} resolution",
        match report.resolution {
            crate::report::Resolution::Original => "original",
            crate::report::Resolution::Model => "model",
        }
    );
    let root = root.titled(&title, ("sans-serif", 22)).map_err(fail)?;
    let panels = root.split_evenly((rows, columns));
    let last = report.prompts.len() as i32 - 1;
    for (index, (dataset, panel)) in report.datasets.iter().zip(&panels).enumerate() {
        let mut chart = ChartBuilder::on(panel)
            .caption(dataset, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(36)
            .build_cartesian_2d(-0.3f64..(last as f64 + 0.3), 0f64..100f64)
            .map_err(fail)?;
        let prompts = report.prompts.clone();
        chart
            .configure_mesh()
            .x_labels(prompts.len().max(2))
            .x_label_formatter(&|x| {
                let i = x.round() as i64;
                if (x - i as f64).abs() < 1e-6 && i >= 0 && (i as usize) < prompts.len() {
                    prompts[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_labels(6)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(fail)?;
        for (m, model) in report.models.iter().enumerate() {
            let color = COLORS[m % COLORS.len()];
            let points: Vec<(f64, f64)> = report
                .prompts
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    let c = report.cell(model, dataset, p)?;
                    (c.dice.n > 0).then_some((i as f64, c.dice.mean * 100.0))
                })
                .collect();
            draw_line(&mut chart, points.clone(), color, model)?;
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(fail)?;
        }
        // The legend once, in the first panel.
        if index == 0 {
            draw_legend(&mut chart)?;
        }
    }
    Ok(())
}

/// Registers a TrueType font for plotters' text, once.
fn load_font() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let path = find_font().ok_or_else(|| {
                "plots need a TrueType font and none was found (install fonts-dejavu-core, or set VLSM_FONT=/path/to/font.ttf)".to_string()
            })?;
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn find_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VLSM_FONT") {
        return Some(PathBuf::from(p));
    }
    const KNOWN: [&str; 6] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
        "C:\\Windows\\Fonts\\arial.ttf",
    ];
    if let Some(p) = KNOWN.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Some(p);
    }
    find_ttf(Path::new("/usr/share/fonts"), 4)
}

fn find_ttf(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in &entries {
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")) {
            return Some(p.clone());
        }
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| find_ttf(p, depth - 1))
}

/// `training.png` and `.svg` in `out`: train and validation loss, and validation Dice, per
/// epoch.
pub fn training_curves(log: &[vlsm::train::EpochLog], out: &Path) -> Result<Vec<PathBuf>> {
    if log.is_empty() {
        return Ok(Vec::new());
    }
    load_font()?;
    render(&TrainingCurves(log), (900, 360), out, "training")
}

struct TrainingCurves<'a>(&'a [vlsm::train::EpochLog]);

impl Figure for TrainingCurves<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        draw_training(self.0, root)
    }
}

fn draw_training<DB: DrawingBackend>(
    log: &[vlsm::train::EpochLog],
    root: &DrawingArea<DB, Shift>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e:?}");
    root.fill(&WHITE).map_err(fail)?;
    let panels = root.split_evenly((1, 2));
    let last = log.last().map_or(1, |e| e.epoch).max(1) as f64;
    let top = log
        .iter()
        .flat_map(|e| [e.train_loss, e.val_loss])
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    // (label, colour, value, panel)
    type Series = (
        &'static str,
        RGBColor,
        fn(&vlsm::train::EpochLog) -> f64,
        usize,
    );
    let series: [Series; 3] = [
        ("train loss", COLORS[0], |e| e.train_loss, 0),
        ("val loss", COLORS[1], |e| e.val_loss, 0),
        ("val Dice", COLORS[2], |e| e.val_dice, 1),
    ];
    for (index, (panel, caption)) in panels.iter().zip(["loss", "validation Dice"]).enumerate() {
        let y_top = if index == 0 { top } else { 1.0 };
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(28)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..last, 0f64..y_top)
            .map_err(fail)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .draw()
            .map_err(fail)?;
        for (label, color, value, panel_index) in &series {
            if *panel_index != index {
                continue;
            }
            let points: Vec<(f64, f64)> = log.iter().map(|e| (e.epoch as f64, value(e))).collect();
            draw_line(&mut chart, points, *color, label)?;
        }
        draw_legend(&mut chart)?;
    }
    Ok(())
}
