"""Conventional sequential recommenders (teachers): SASRec, GRU4Rec, Caser."""

from delrec.teachers.train import CandidateTeacher, TeacherConfig, load_teacher, load_topk, train_teacher

__all__ = ["CandidateTeacher", "TeacherConfig", "load_teacher", "load_topk", "train_teacher"]
