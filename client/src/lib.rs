//! The Backbone client library.
