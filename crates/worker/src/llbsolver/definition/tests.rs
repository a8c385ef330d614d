//! Definition loader tests.
