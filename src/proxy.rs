//! The proxy data path. (To be built.)
