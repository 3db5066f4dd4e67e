//! The presets as instances of the engine: which axes the rules scale (the others keep SP's
//! conventions), and the descriptors of the groups of the MoE-ResNet and MoE-Transformer.

use super::engine::{Dim, GroupSpec, Role};
use super::{Axis, Group};

/// A preset: the set of axes along which the engine's rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub scaled: &'static [Axis],
}

pub const PRESETS: [Preset; 4] = [
    Preset { name: "sp", scaled: &[] },
    Preset { name: "mup", scaled: &[Axis::Width] },
    Preset { name: "completep", scaled: &[Axis::Width, Axis::Depth] },
    Preset { name: "moe-completep", scaled: &[Axis::Width, Axis::Depth, Axis::Experts, Axis::ExpertHidden] },
];

impl Preset {
    pub fn by_name(name: &str) -> crate::Result<Preset> {
        PRESETS.into_iter().find(|p| p.name == name).ok_or_else(|| {
            let names: Vec<_> = PRESETS.iter().map(|p| p.name).collect();
            crate::Error::invalid("preset", format!("unknown preset `{name}`; expected one of {}", names.join(", ")))
        })
    }

    pub fn scales(&self, axis: Axis) -> bool {
        self.scaled.contains(&axis)
    }
}

fn spec(group: Group, fan_in: Dim, fan_out: Dim, role: Role, residual_branch: bool, feeds: Option<Group>) -> GroupSpec {
    GroupSpec {
        name: group.name().to_string(),
        fan_in,
        fan_out,
        role,
        residual_branch,
        feeds: feeds.map(|g| g.name().to_string()),
        init: None,
    }
}

/// Descriptors of the built-in groups (SPEC §2 names). Attention projections map the width to
/// heads x d_head, which grows with the width.
pub fn builtin_specs() -> Vec<GroupSpec> {
    use Dim::*;
    vec![
        spec(Group::Embedding, Fixed, Width, Role::Input, false, None),
        spec(Group::AttnQkv, Width, Width, Role::Hidden, true, Some(Group::AttnOut)),
        spec(Group::AttnOut, Width, Width, Role::Hidden, true, None),
        spec(Group::Router, Width, Experts, Role::Router, true, None),
        spec(Group::ExpertUp, Width, ExpertHidden, Role::Expert, true, Some(Group::ExpertDown)),
        spec(Group::ExpertDown, ExpertHidden, Width, Role::Expert, true, None),
        spec(Group::ExpertBias, Fixed, Experts, Role::SelectionBias, true, None),
        spec(Group::Norm, Fixed, Width, Role::Gain, true, None),
        spec(Group::Unembedding, Width, Fixed, Role::Readout, false, None),
        spec(Group::Readout, Width, Fixed, Role::Readout, false, None),
    ]
}
