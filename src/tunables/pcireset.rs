//! `pci-reset:` (pre-start): the VM's passthrough devices reset before QEMU starts (seed 003:
//! a GPU that shows a black screen on its second start until all its functions are removed
//! and rescanned).
//!
//! Kernel files: `/sys/bus/pci/devices/<id>/remove` and `/sys/bus/pci/rescan` (write-only
//! triggers; `Action::RemoveRescan`), `/sys/bus/pci/devices/<id>/reset` (write-only: the
//! kernel resets with the first method of `reset_method` that works).
//!
//! Why `remove-rescan` is the default: right after pre-start qemu-server binds every
//! passthrough function to vfio-pci and writes its `reset` when it has one
//! (`prepare_pci_device`, "FLR-reset where supported"), so `reset` here mostly repeats what
//! qemu-server does anyway; removing and rescanning is what it never does, and what the
//! seed's black screen needed.

use crate::devices::PCI_DEVICES;
use crate::pci::driver_name;
use crate::plan::{Action, Inputs, Plan, PlanError, Step};
use crate::profile::ResetMethod;

const TUNABLE: &str = "pci-reset";
const VFIO: &str = "vfio-pci";

pub fn validate(inp: &Inputs) -> Result<(), PlanError> {
    let Some(reset) = &inp.profile.pci_reset else {
        return Ok(());
    };
    let err = |m: String| PlanError::at(TUNABLE, &reset.at, m);
    if let Some(why) = inp.devices.unresolved.first() {
        return Err(err(why.clone()));
    }
    if inp.devices.functions.is_empty() {
        return Err(err(
            "nothing to reset: the VM config has no hostpciN and the profile lists no devices"
                .into(),
        ));
    }
    for f in &inp.devices.functions {
        if !f.present {
            return Err(err(format!(
                "PCI {} ({}) is not present ({PCI_DEVICES}/{} does not exist): refused \
                 before anything changes",
                f.id, f.from, f.id
            )));
        }
        if let Some(driver) = &f.driver
            && driver != VFIO
            && !reset.allow_host_driver
        {
            return Err(err(format!(
                "PCI {} ({}) is bound to the host driver {driver}, not {VFIO}: the host may \
                 be using it. Bind it to {VFIO} (vfio-pci.ids= on the kernel command line, or \
                 a driver_override), or set pci-reset.allow-host-driver: true",
                f.id, f.from
            )));
        }
        if reset.method == ResetMethod::Reset && (!f.reset || f.reset_method.as_deref() == Some(""))
        {
            return Err(err(format!(
                "PCI {} ({}) has no reset attribute: the kernel knows no reset method for it; \
                 use method: remove-rescan",
                f.id, f.from
            )));
        }
    }
    Ok(())
}

pub fn plan(inp: &Inputs, plan: &mut Plan) {
    let Some(reset) = &inp.profile.pci_reset else {
        return;
    };
    let step = |action| Step {
        tunable: TUNABLE,
        action,
    };
    for f in &inp.devices.functions {
        if f.driver.as_deref().is_some_and(|d| d != VFIO) {
            plan.notes.push(format!(
                "warning: PCI {} is bound to the host driver {} (allow-host-driver: true)",
                f.id,
                driver_name(&f.driver)
            ));
        }
    }
    match reset.method {
        ResetMethod::RemoveRescan => plan.steps.push(step(Action::RemoveRescan {
            functions: inp
                .devices
                .functions
                .iter()
                .map(|f| (f.id, f.driver.clone()))
                .collect(),
            timeout_ms: reset.timeout_ms,
        })),
        ResetMethod::Reset => {
            for f in &inp.devices.functions {
                plan.steps.push(step(Action::Trigger {
                    path: format!("{PCI_DEVICES}/{}/reset", f.id),
                    value: "1".into(),
                }));
            }
        }
    }
    // The steps after a reset are a batch of their own: the reset is not held under any lock.
    plan.steps.push(step(Action::Barrier));
}
