//! The fused AdamW step (one pass per group). Filled in by issue 7; until then every group takes the
//! reference path.

use crate::optim::{StepReport, WidthScaledAdamW};

/// Steps every group with the fused kernel. Returns false when it did nothing, in which case the caller
/// runs the reference path.
pub(crate) fn step_groups(_opt: &mut WidthScaledAdamW, _t: u64, _lr_mult: f64, _wd_mult: f64, _report: &mut StepReport) -> bool {
    false
}
