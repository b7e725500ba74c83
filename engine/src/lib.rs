//! The migration engine: node daemons that checkpoint a container, stream it with [`transport`],
//! assemble the restore image and restore it. Not built yet: this crate holds the place the
//! workspace layout gives it.
