//! Renderings of a resolved [`Table`]: aligned text, JSON (SPEC §4), Markdown, and PyTorch param groups.

use super::config::Table;
use super::{Axis, Optimizer};

/// Output formats of `moe-dmft param`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Table,
    Json,
    Markdown,
    Torch,
}

pub fn render(table: &Table, format: Format) -> crate::Result<String> {
    match format {
        Format::Table => Ok(text(table)),
        Format::Json => json(table),
        Format::Markdown => Ok(markdown(table)),
        Format::Torch => Ok(torch(table)),
    }
}

/// SPEC §4's JSON object, pretty-printed.
pub fn json(table: &Table) -> crate::Result<String> {
    serde_json::to_string_pretty(table).map_err(|e| crate::Error::Internal(format!("serializing the table: {e}")))
}

fn optimizer_name(o: Optimizer) -> &'static str {
    match o {
        Optimizer::Sgd => "sgd",
        Optimizer::Adam => "adam",
    }
}

fn sizes_line(table: &Table) -> String {
    let s = &table.sizes;
    let b = &table.base;
    format!(
        "width={} depth={} experts={} active={} expert_hidden={} (base: width={} depth={} experts={} active={} expert_hidden={})",
        s.width, s.depth, s.experts, s.active, s.expert_hidden, b.width, b.depth, b.experts, b.active, b.expert_hidden
    )
}

/// An exponent as a short decimal (0.5 steps are the common case).
fn exp(v: f64) -> String {
    let r = (v * 1000.0).round() / 1000.0;
    if r == 0.0 {
        "0".into()
    } else {
        format!("{r}")
    }
}

/// Like C's `%.6g`: plain decimals for moderate magnitudes, scientific otherwise.
fn num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if (1e-3..1e5).contains(&a) {
        let digits = (5 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        format!("{v:.5e}")
    }
}

fn eps_str(v: Option<f64>) -> String {
    v.map(num).unwrap_or_else(|| "-".into())
}

/// Exponents of one quantity along the four axes, `width/depth/experts/expert_hidden`.
fn axes_str(table: &Table, row: usize, pick: impl Fn(&super::config::QuantityExponents) -> Option<f64>) -> String {
    Axis::ALL
        .iter()
        .map(|&a| pick(table.groups[row].exponents.get(a)).map(exp).unwrap_or_else(|| "-".into()))
        .collect::<Vec<_>>()
        .join("/")
}

fn text(table: &Table) -> String {
    let mut out = format!(
        "preset {}, optimizer {}\n{}\nresidual_multiplier {}\nexponents per axis: width/depth/experts/expert_hidden\n\n",
        table.preset,
        optimizer_name(table.optimizer),
        sizes_line(table),
        num(table.residual_multiplier)
    );
    let header = ["group", "init_std", "multiplier", "lr", "adam_eps", "weight_decay", "init_var exp", "mult exp", "lr exp", "eps exp"];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for (i, r) in table.groups.iter().enumerate() {
        lines.push(vec![
            r.name.clone(),
            num(r.init_std),
            num(r.multiplier),
            num(r.lr),
            eps_str(r.adam_eps),
            num(r.weight_decay),
            axes_str(table, i, |q| Some(q.init_var)),
            axes_str(table, i, |q| Some(q.multiplier)),
            axes_str(table, i, |q| Some(q.lr)),
            axes_str(table, i, |q| q.adam_eps),
        ]);
    }
    let widths: Vec<usize> = (0..header.len()).map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0)).collect();
    for l in &lines {
        let cells: Vec<String> = l.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn markdown(table: &Table) -> String {
    let mut out = format!(
        "**{}**, {} — {}; residual multiplier {}\n\n| group | init std | multiplier | lr | Adam eps | weight decay |\n| --- | --- | --- | --- | --- | --- |\n",
        table.preset,
        optimizer_name(table.optimizer),
        sizes_line(table),
        num(table.residual_multiplier)
    );
    for r in &table.groups {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.name,
            num(r.init_std),
            num(r.multiplier),
            num(r.lr),
            eps_str(r.adam_eps),
            num(r.weight_decay)
        ));
    }
    out.push_str("\nExponents along width / depth / experts / expert_hidden:\n\n| group | init var | multiplier | lr | Adam eps |\n| --- | --- | --- | --- | --- |\n");
    for (i, r) in table.groups.iter().enumerate() {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.name,
            axes_str(table, i, |q| Some(q.init_var)),
            axes_str(table, i, |q| Some(q.multiplier)),
            axes_str(table, i, |q| Some(q.lr)),
            axes_str(table, i, |q| q.adam_eps)
        ));
    }
    out
}

/// A Python float literal (Rust's `{:?}` of a finite f64 is valid Python).
fn py(v: f64) -> String {
    format!("{v:?}")
}

fn torch(table: &Table) -> String {
    let adam = table.optimizer == Optimizer::Adam;
    let mut out = format!(
        "# moe-dmft param: preset {}, optimizer {}\n# {}\n# residual multiplier beta_L = {} (multiply every residual branch's output by it)\n\
         # `groups` maps each group name to the list of that group's tensors, e.g. groups[\"router\"] = [blk.router.weight for blk in model.blocks].\n\
         # Initialise each tensor with the init_std below and multiply its output by the multiplier.\n",
        table.preset,
        optimizer_name(table.optimizer),
        sizes_line(table),
        py(table.residual_multiplier)
    );
    out.push_str("param_groups = [\n");
    for r in &table.groups {
        if r.name == "expert_bias" {
            out.push_str(&format!(
                "    # expert_bias: not an optimizer group (selection only); balancing update rate {} per step\n",
                py(r.lr)
            ));
            continue;
        }
        let eps = match (adam, r.adam_eps) {
            (true, Some(e)) => format!(", \"eps\": {}", py(e)),
            _ => String::new(),
        };
        out.push_str(&format!(
            "    {{\"params\": groups[{:?}], \"lr\": {}{}, \"weight_decay\": {}}},  # {}: init_std={}, multiplier={}\n",
            r.name,
            py(r.lr),
            eps,
            py(r.weight_decay),
            r.name,
            py(r.init_std),
            py(r.multiplier)
        ));
    }
    out.push_str("]\n");
    if adam {
        out.push_str("# optimizer = torch.optim.AdamW(param_groups)  # AdamW's decay per step is lr * weight_decay\n");
    } else {
        out.push_str("# optimizer = torch.optim.SGD(param_groups)  # note: torch SGD's weight_decay is L2, scaled by lr like the gradient\n");
    }
    out
}
