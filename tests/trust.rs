//! Placeholder for the lead's trust suite (it replaces this file on merge):
//! one harness-based test so that `bench-scripts/test` runs a `trust`
//! suite in the guest on this branch.

mod common;

use common::*;

/// A device made with `add null` is listed LIVE, then deleted with its server.
#[test]
fn add_then_del_leaves_nothing() {
    let Some(_h) = harness() else { return };
    let dev = add(&["null"]);
    del(dev.id);
    assert_gone(&dev);
}
