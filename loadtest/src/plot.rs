//! `--plot FILE.svg`: throughput over time and latency percentiles.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::report::{Percentiles, RunResult};

const LABELS: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

fn points(p: &Percentiles) -> [u64; 5] {
    [p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us]
}

/// Draws the result: acknowledged sends per second (left) and latency
/// percentiles for send→ack and send→push (right, log scale).
pub fn draw(result: &RunResult, path: &Path) -> anyhow::Result<()> {
    let error =
        |e: DrawingAreaErrorKind<std::io::Error>| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (1200, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(error)?;
    let (left, right) = root.split_horizontally(600);

    let seconds = result.acked_per_second.len().max(1) as u32;
    let peak = result
        .acked_per_second
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let mut throughput = ChartBuilder::on(&left)
        .caption("acknowledged sends per second", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0u32..seconds, 0u64..peak + peak / 10)
        .map_err(error)?;
    throughput
        .configure_mesh()
        .x_desc("second of the run")
        .y_desc("sends/s")
        .draw()
        .map_err(error)?;
    throughput
        .draw_series(LineSeries::new(
            result
                .acked_per_second
                .iter()
                .enumerate()
                .map(|(second, count)| (second as u32, *count)),
            &BLUE,
        ))
        .map_err(error)?;

    let highest = points(&result.send_ack)
        .into_iter()
        .chain(points(&result.push))
        .max()
        .unwrap_or(1)
        .max(2);
    let mut latency = ChartBuilder::on(&right)
        .caption("latency (µs, log scale)", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..LABELS.len(), (1u64..highest * 2).log_scale())
        .map_err(error)?;
    latency
        .configure_mesh()
        .x_labels(LABELS.len())
        .x_label_formatter(&|index| LABELS.get(*index).copied().unwrap_or("").to_owned())
        .y_desc("µs")
        .draw()
        .map_err(error)?;
    for (name, percentiles, color) in [
        ("send→ack", &result.send_ack, RED),
        ("send→push", &result.push, GREEN),
    ] {
        latency
            .draw_series(LineSeries::new(
                points(percentiles)
                    .into_iter()
                    .map(|v| v.max(1))
                    .enumerate(),
                &color,
            ))
            .map_err(error)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    latency
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(error)?;
    root.present().map_err(error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_draws_to_an_svg_with_both_panels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.svg");
        let result = RunResult {
            acked_per_second: vec![10, 20, 15],
            send_ack: Percentiles {
                count: 3,
                p50_us: 100,
                p90_us: 200,
                p99_us: 400,
                p999_us: 800,
                max_us: 900,
            },
            push: Percentiles {
                count: 3,
                p50_us: 120,
                p90_us: 220,
                p99_us: 420,
                p999_us: 820,
                max_us: 950,
            },
            ..RunResult::default()
        };
        draw(&result, &path).expect("draws");
        let svg = std::fs::read_to_string(&path).expect("written");
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("acknowledged sends per second"));
        assert!(svg.contains("send→push"));
        assert!(
            svg.matches("<polyline").count() >= 3,
            "one throughput line and two latency lines"
        );
    }
}
