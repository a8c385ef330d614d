//! exporter (skeleton).
