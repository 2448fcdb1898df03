//! The identity-service emulator and echo upstream. (To be built.)
