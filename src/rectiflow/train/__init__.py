"""rectiflow.train"""
