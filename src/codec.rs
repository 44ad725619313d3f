//! One tensor's HIGGS format. PLACEHOLDER (the lead writes this).
