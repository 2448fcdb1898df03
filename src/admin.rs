//! Admin listener: health, readiness, Prometheus metrics and token status. (To be built.)
