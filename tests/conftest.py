"""Starts the suite's one long test, the CartPole learning run (tests/test_train.py), in its own process as soon as
it is selected, so that it overlaps the rest of the suite instead of following it; ends it with the session."""

LEARNING_TEST = "test_cartpole_learns_and_holds"
started = []  # the test module whose run was started


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for item in session.items:
        if item.name == LEARNING_TEST:
            item.module.start_learning_run()
            started.append(item.module)
            return


def pytest_sessionfinish(session):
    for module in started:
        module.stop_learning_run()
