"""rectiflow.sample"""
