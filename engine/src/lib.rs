//! The migration engine: node daemons that checkpoint a container, stream it with [`transport`],
//! assemble the restore image and restore it. Built so far: [`archive`] reads and validates a
//! checkpoint archive (and extracts it safely), and [`inspect`] reports what one holds. The
//! daemon, the runtime seam and image assembly come next (issue 3).

pub mod archive;
pub mod inspect;
