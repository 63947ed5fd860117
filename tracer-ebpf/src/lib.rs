#![no_std]
// This file exists so that the package has a library target that tracer's build script can
// depend on; the programs live in main.rs.
