//! layerstore (skeleton).
