//! Draws the plots of docs/benchmarks.md from the data `make bench`'s other benchmarks left in
//! `target/bench` (so a plot always shows the run its table shows): the time until all
//! consumers are counted against N for each way (log-log), and the data mover's throughput by
//! tool and link. SVG, so that they render where the Markdown does and diff as text.

use std::error::Error;
use std::path::Path;

use plotters::prelude::*;

type Drawn = Result<(), Box<dyn Error>>;

/// Rows of a tab-separated file a benchmark wrote.
fn read_rows(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}; `make bench` writes it", path.display()));
    text.lines()
        .map(|line| line.split('\t').map(str::to_owned).collect())
        .collect()
}

/// A way of counting consumers and its points (N, seconds until all counted).
type Way = (String, Vec<(f64, f64)>);

/// Each way's points, in the order the ways first appear.
fn ways(rows: &[Vec<String>]) -> Result<Vec<Way>, Box<dyn Error>> {
    let mut ways: Vec<Way> = vec![];
    for row in rows {
        let [way, n, seconds] = row.as_slice() else {
            return Err(format!("contention row {row:?}").into());
        };
        let point = (n.parse::<f64>()?, seconds.parse::<f64>()?);
        match ways.iter_mut().find(|(w, _)| w == way) {
            Some((_, points)) => points.push(point),
            None => ways.push((way.clone(), vec![point])),
        }
    }
    Ok(ways)
}

fn contention_plot(rows: &[Vec<String>], out: &Path) -> Drawn {
    let ways = ways(rows)?;
    let points = ways.iter().flat_map(|(_, p)| p.iter());
    let (min_n, max_n, min_s, max_s) = points.fold(
        (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
        |(a, b, c, d), (n, s)| (a.min(*n), b.max(*n), c.min(*s), d.max(*s)),
    );
    let root = SVGBackend::new(out, (820, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Time until all N consumers are counted", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (min_n / 1.5..max_n * 1.5).log_scale(),
            (min_s / 1.5..max_s * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 15))
        .x_desc("consumers of one template at the same moment (N)")
        .y_desc("seconds until all are counted")
        .draw()?;
    for (index, (way, points)) in ways.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(way.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

fn mover_plot(rows: &[Vec<String>], out: &Path) -> Drawn {
    let mut bars = vec![];
    for row in rows {
        let [link, source, tool, streams, rate] = row.as_slice() else {
            return Err(format!("mover row {row:?}").into());
        };
        let label = format!("{link} · {source} · {tool} · {streams} stream(s)");
        bars.push((label, rate.parse::<f64>()?, tool.starts_with("mover")));
    }
    let widest = bars.iter().map(|(_, rate, _)| *rate).fold(0.0, f64::max) * 1.12;
    let count = bars.len() as f64;
    let height = 110 + 30 * u32::try_from(bars.len())?;
    let root = SVGBackend::new(out, (820, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Data mover throughput by tool and link", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(10)
        .build_cartesian_2d(0.0..widest, 0.0..count)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .label_style(("sans-serif", 15))
        .x_desc("MiB/s to a verified file")
        .draw()?;
    for (index, (label, rate, is_mover)) in bars.iter().enumerate() {
        // The first row on top, as in the table.
        let y = count - 1.0 - index as f64;
        let color = if *is_mover {
            RGBColor(70, 130, 200)
        } else {
            RGBColor(170, 170, 170)
        };
        chart.draw_series([Rectangle::new(
            [(0.0, y + 0.12), (*rate, y + 0.88)],
            color.mix(0.45).filled(),
        )])?;
        chart.draw_series([Text::new(
            format!("{label}: {rate:.0}"),
            (widest * 0.01, y + 0.72),
            ("sans-serif", 13),
        )])?;
    }
    root.present()?;
    Ok(())
}

fn main() {
    // `cargo test --all-targets` runs bench targets without --bench: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("plots: draws docs/plots; run it with `cargo bench --bench plots`");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (data, out) = (root.join("target/bench"), root.join("docs/plots"));
    std::fs::create_dir_all(&out).expect("docs/plots");
    let contention = read_rows(&data.join("contention.tsv"));
    contention_plot(&contention, &out.join("contention.svg")).expect("contention plot");
    let mover = read_rows(&data.join("mover-streams.tsv"));
    mover_plot(&mover, &out.join("mover-streams.svg")).expect("mover plot");
    println!("plots: wrote docs/plots/contention.svg and docs/plots/mover-streams.svg");
}
