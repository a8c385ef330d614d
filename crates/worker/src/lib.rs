//! worker (skeleton).
