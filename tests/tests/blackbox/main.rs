//! The black-box tests: the real server on 127.0.0.1:0, spoken to over
//! HTTP. One test binary, a module per area, so the 2-core CI machine
//! compiles and links the test dependencies once instead of once per file.
//! (`responsiveness.rs` keeps a binary of its own: it times `/predict`
//! while a job trains, so no other test may share the cores with it.)

mod api;
mod attributions;
mod charts;
mod ecosystem;
mod faithfulness;
mod fidelity;
mod gradcam;
mod gradients;
mod graph_api;
mod graph_fidelity;
mod graph_ops;
mod graph_training;
mod hostile;
mod inspection;
mod oip;
mod openapi;
mod sanity;
mod store;
mod training;
mod training_fidelity;
