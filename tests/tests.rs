//! Kindling's integration tests: one binary, a module per topic. Each test is a specification
//! of behaviour, with fixed seeds and tiny configs.

mod architectures;
mod common;
mod distributed;
mod downstream;
mod end_to_end;
mod example;
mod export;
mod finetune;
mod fuzz;
mod gpu_kernels;
mod hub;
mod hub_lies;
mod import;
mod kernels;
mod lifecycle;
mod masking;
mod model;
mod recipe_errors;
mod resnet;
mod resume;
mod simcse;
mod vision;
mod vit;
