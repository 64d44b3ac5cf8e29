//! pabal's end-to-end tests live in `tests/` (a real relay on loopback, once per I/O
//! backend); their helpers are in `pabal-testkit`. This library is empty: Cargo needs one
//! target besides the tests.
