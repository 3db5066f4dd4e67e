//! Where two parameterizations scale differently along one axis: the groups and quantities whose
//! exponents differ. This is what "the axes a preset ignores" means in numbers: an HP-transfer sweep
//! of a preset along an axis can only drift away from the reference preset's optimum through these
//! differences (an Adam-epsilon-only difference moves nothing while epsilon is far below the gradient
//! RMS).

use super::{Axis, Table};

/// The exponent of one quantity of one group along one axis, in two tables.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingDifference {
    /// Group name, or `residual branch` for beta_L.
    pub group: String,
    /// `init_var`, `multiplier`, `lr`, `adam_eps`.
    pub quantity: &'static str,
    pub exponent: f64,
    pub reference_exponent: f64,
}

impl ScalingDifference {
    /// Adam epsilon is the one quantity whose scaling leaves the update size alone while epsilon is far
    /// below the gradient RMS.
    pub fn eps_only(&self) -> bool {
        self.quantity == "adam_eps"
    }
}

/// Every exponent along `axis` in which `table` differs from `reference` (groups matched by name;
/// a group present in only one table is not compared), in the reference's group order.
pub fn scaling_differences(table: &Table, reference: &Table, axis: Axis) -> Vec<ScalingDifference> {
    // Exponents come from small rational rules; anything closer than this is the same rule.
    const TOL: f64 = 1e-9;
    let mut out = Vec::new();
    let mut push = |group: &str, quantity: &'static str, exponent: f64, reference_exponent: f64| {
        if (exponent - reference_exponent).abs() > TOL {
            out.push(ScalingDifference { group: group.to_string(), quantity, exponent, reference_exponent });
        }
    };
    push("residual branch", "multiplier", table.residual_exponents.get(axis), reference.residual_exponents.get(axis));
    for r in &reference.groups {
        let Some(row) = table.row(&r.name) else { continue };
        let (a, b) = (row.exponents.get(axis), r.exponents.get(axis));
        push(&r.name, "init_var", a.init_var, b.init_var);
        push(&r.name, "multiplier", a.multiplier, b.multiplier);
        push(&r.name, "lr", a.lr, b.lr);
        if let (Some(x), Some(y)) = (a.adam_eps, b.adam_eps) {
            push(&r.name, "adam_eps", x, y);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::param::{ParamConfig, Sizes};

    fn table(preset: &str) -> Table {
        let base = Sizes { width: 64, depth: 2, experts: 8, active: 2, expert_hidden: 64 };
        let cfg = ParamConfig { preset: preset.into(), base: Some(base), ..ParamConfig::default() };
        cfg.resolve_table(&base).unwrap()
    }

    #[test]
    fn a_preset_does_not_differ_from_itself() {
        let t = table("moe-completep");
        for axis in Axis::ALL {
            assert!(scaling_differences(&t, &t, axis).is_empty());
        }
    }

    #[test]
    fn mup_ignores_the_residual_scaling_along_depth_and_equals_moe_completep_along_width() {
        let (mup, moe) = (table("mup"), table("moe-completep"));
        let depth = scaling_differences(&mup, &moe, Axis::Depth);
        let residual = depth.iter().find(|d| d.group == "residual branch").expect("beta_L differs along depth");
        assert_eq!((residual.exponent, residual.reference_exponent), (0.0, -1.0));
        // Along width both are muP: no exponent differs, epsilon included.
        assert!(scaling_differences(&mup, &moe, Axis::Width).is_empty());
    }

    #[test]
    fn mup_differs_along_expert_hidden_in_the_expert_down_rate() {
        let d = scaling_differences(&table("mup"), &table("moe-completep"), Axis::ExpertHidden);
        let lr = d.iter().find(|d| d.group == "expert_down" && d.quantity == "lr").expect("expert_down lr differs");
        assert_eq!((lr.exponent, lr.reference_exponent), (0.0, -1.0));
    }

    #[test]
    fn along_experts_adam_rates_agree_and_only_epsilon_differs() {
        // Renormalized gates average over k experts, so under Adam no rate scales with M (SPEC §4).
        for preset in ["sp", "mup"] {
            let d = scaling_differences(&table(preset), &table("moe-completep"), Axis::Experts);
            assert!(!d.is_empty(), "{preset}: epsilon should differ");
            assert!(d.iter().all(ScalingDifference::eps_only), "{preset}: {d:?}");
        }
    }
}
