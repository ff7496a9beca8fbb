//! `cargo fuzz run idx`: the IDX parser (raw and gzip) on arbitrary bytes
//! must return `Ok` or an error, never panic or allocate from an unchecked header.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = aimass::data::idx::parse_idx(data, "fuzz");
    // The same bytes as an image file and, split in two, as an image/label pair.
    let mid = data.first().map_or(0, |&b| b as usize).min(data.len());
    let _ = aimass::data::idx::idx_dataset_from_bytes(&data[..mid], &data[mid..], "images", "labels");
});
