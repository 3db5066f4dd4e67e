//! Renderings of a resolved [`super::Table`]: aligned text, JSON (SPEC §4), Markdown and PyTorch param groups.
