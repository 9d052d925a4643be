"""rectiflow.eval"""
