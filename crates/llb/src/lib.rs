//! llb (skeleton).
