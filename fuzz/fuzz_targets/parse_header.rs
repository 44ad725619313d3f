//! `parse_header` must be total: any bytes give a header or a `Format` error, never a panic,
//! and an accepted header must be self-consistent.
#![no_main]

use higgs_rs::checkpoint::parse_header;
use higgs_rs::HiggsError;
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8], file_len: u64) {
    match parse_header(data, file_len) {
        Ok(header) => {
            // Accepted: the tensors tile the data section exactly, with consistent sizes.
            assert_eq!(header.data_start, 8 + header.header_len);
            assert_eq!(header.data_start as u64 + header.data_len as u64, file_len);
            assert!(header.data_start <= data.len());
            let mut covered = 0usize;
            for t in &header.tensors {
                assert_eq!(t.data_offsets[0], covered);
                assert_eq!(
                    t.dtype.byte_len(&t.shape),
                    Some(t.data_offsets[1] - t.data_offsets[0])
                );
                covered = t.data_offsets[1];
            }
            assert_eq!(covered, header.data_len);
            let mut names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), header.tensors.len());
        }
        Err(HiggsError::Format { message, .. }) => assert!(!message.is_empty()),
        Err(other) => panic!("unexpected error kind: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // The input as a whole file, and as a prefix of a longer one (data section not read).
    check(data, data.len() as u64);
    if let Some(&extra) = data.last() {
        check(data, data.len() as u64 + extra as u64 * 4096);
    }
});
