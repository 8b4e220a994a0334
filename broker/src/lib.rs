//! The Backbone broker library.
