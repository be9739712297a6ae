"""Post-accumulate-grad hooks that hold their store weakly (a hook of a collected store does nothing)
and go with it: removed when the store is collected, or by remove_all."""
import weakref


def register(store, hooks, method):
    """For each (parameter, args) in hooks, a hook calling store.<method>(*args, parameter); returns
    the handles (also removed when store is collected)."""
    handles = []
    weakref.finalize(store, remove_all, handles)
    owner = weakref.ref(store)
    for param, args in hooks:
        handles.append(param.register_post_accumulate_grad_hook(_calling(owner, method, args)))
    return handles


def remove_all(handles):
    for handle in handles:
        handle.remove()
    handles.clear()


def _calling(owner, method, args):
    def hook(param):
        store = owner()
        if store is not None:
            getattr(store, method)(*args, param)
    return hook
