//! Places where a test build (cargo feature `test_hooks`) lets the end-to-end tests stop or
//! steer a relay, so that they open a race's window on purpose instead of hoping to hit it.
//! In every other build these functions are empty and compile away.
//!
//! A hook is armed by a file in the data directory (every server process's working
//! directory), named after the hook and the database whose relay it applies to:
//!
//! | file                                              | what the relay of `<database>` does |
//! |---------------------------------------------------|-------------------------------------|
//! | `outbox_test_hold.after_extension_check.<database>` | having looked for the extension and found none (or been unable to tell), waits there while the file exists; meanwhile `outbox_test_held.after_extension_check.<database>` exists |
//! | `outbox_test_hold.before_slot_creation.<database>` | having found the extension and no slot, waits before making the slot, likewise |
//! | `outbox_test_abandon.<database>`                  | right after it starts, stops being wanted and exits, as a relay that lost its request would |

/// A point in the relay's life where a test can hold it.
#[derive(Clone, Copy, Debug)]
pub enum Point {
    /// In the Looking phase, between the look for the extension that found none and acting on
    /// it (see `relays.rs`).
    AfterExtensionCheck,
    /// The extension is installed and the relay is about to make its slot (state `starting`).
    BeforeSlotCreation,
}

#[cfg(feature = "test_hooks")]
impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::AfterExtensionCheck => "after_extension_check",
            Point::BeforeSlotCreation => "before_slot_creation",
        }
    }
}

/// Holds the relay of `database` at `point` while a test has armed it (a test build only).
#[cfg(feature = "test_hooks")]
pub fn hold(point: Point, database: &str) {
    use std::path::Path;
    let armed = format!("outbox_test_hold.{}.{database}", point.name());
    if !Path::new(&armed).exists() {
        return;
    }
    let held = format!("outbox_test_held.{}.{database}", point.name());
    pgrx::log!("outbox_ext relay: held at {point:?} for a test");
    let _ = std::fs::write(&held, b"");
    while Path::new(&armed).exists() && super::signals::sleep(std::time::Duration::from_millis(10)) {}
    let _ = std::fs::remove_file(&held);
    pgrx::log!("outbox_ext relay: released at {point:?}");
}

#[cfg(not(feature = "test_hooks"))]
#[inline(always)]
pub fn hold(_point: Point, _database: &str) {}

/// Whether a test asks the relay of `database` to behave as if its request had been lost (a
/// test build only).
#[cfg(feature = "test_hooks")]
pub fn abandon(database: &str) -> bool {
    let armed = std::path::Path::new(&format!("outbox_test_abandon.{database}")).exists();
    if armed {
        pgrx::log!("outbox_ext relay: abandoning its database for a test, as if its request had been lost");
    }
    armed
}

#[cfg(not(feature = "test_hooks"))]
#[inline(always)]
pub fn abandon(_database: &str) -> bool {
    false
}
