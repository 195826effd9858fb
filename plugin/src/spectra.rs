//! Singular-value spectra of weight matrices (issue 3).
