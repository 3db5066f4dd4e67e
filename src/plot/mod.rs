//! plot (being written).
