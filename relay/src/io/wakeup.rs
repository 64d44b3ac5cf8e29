//! placeholder: implemented by the backend work
