"""Conventional sequential recommenders (teachers): SASRec, GRU4Rec, Caser."""
