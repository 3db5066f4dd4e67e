//! Figures are written as PNG and SVG with the expected sizes and contents.

use moe_dmft::plot::{line_plot, panel_grid, Panel, Series, PANEL_SIZE};

fn demo_panel(log: bool) -> Panel {
    let mut p = Panel::new("router logit change", "width N", "RMS change");
    if log {
        p = p.log_x().log_y();
    }
    p.with(Series::new("moe-completep", vec![(64.0, 0.5, 0.05), (128.0, 0.52, 0.04), (256.0, 0.49, 0.03)]))
        .with(Series::new("sp", vec![(64.0, 0.5, 0.05), (128.0, 1.1, 0.1), (256.0, 2.2, 0.2)]))
        .with(Series::from_xy("slope 1", [(64.0, 0.5), (256.0, 2.0)]).dashed())
}

#[test]
fn line_plot_writes_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let files = line_plot(&dir.path().join("sub/one"), &demo_panel(true)).unwrap();
    assert_eq!(files.len(), 2);
    let png = std::fs::read(&files[0]).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // Width and height from the IHDR chunk.
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((w, h), PANEL_SIZE);
    let svg = std::fs::read_to_string(&files[1]).unwrap();
    assert!(svg.contains("<svg") && svg.contains("moe-completep") && svg.contains("width N"));
}

#[test]
fn grid_has_one_cell_per_panel() {
    let dir = tempfile::tempdir().unwrap();
    let panels = vec![demo_panel(false), demo_panel(true), demo_panel(false)];
    let files = panel_grid(&dir.path().join("grid"), "coordinate check", &panels, 2).unwrap();
    let png = std::fs::read(&files[0]).unwrap();
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((w, h), (2 * PANEL_SIZE.0, 2 * PANEL_SIZE.1 + 40));
    let svg = std::fs::read_to_string(&files[1]).unwrap();
    assert_eq!(svg.matches("router logit change").count(), 3);
}

#[test]
fn empty_grid_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(panel_grid(&dir.path().join("x"), "", &[], 2).is_err());
    // A panel with no positive values on a log axis still renders.
    let p = Panel::new("t", "x", "y").log_y().with(Series::from_xy("neg", [(1.0, -1.0), (2.0, 0.0)]));
    assert!(line_plot(&dir.path().join("neg"), &p).is_ok());
}
