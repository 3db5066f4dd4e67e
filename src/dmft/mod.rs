//! dmft (being written).
