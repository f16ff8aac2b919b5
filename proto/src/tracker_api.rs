//! Tracker API v1 types (work in progress).
