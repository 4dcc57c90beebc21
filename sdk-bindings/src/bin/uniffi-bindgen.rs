//! uniffi's bindings generator, built from the same uniffi version as the library:
//! `cargo run -p flotilla-sdk --features cli --bin uniffi-bindgen -- generate --library
//! <libflotilla_sdk.so> --language python --out-dir <dir>`.

fn main() {
    uniffi::uniffi_bindgen_main();
}
