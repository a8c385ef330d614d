//! dockerstore (in progress).
