"""A --custom-reward-function for the tests: the demo task's final-answer grading (rewards.synthetic's), written as
a user would write a plug-in: one (response, gold) pair in, True/False or a declared status out."""

from megatron_scope.rewards.synthetic import STATUS_NO_ANSWER, canonical_answer, extract_answer



def judge(response_text: str, gold_answer: str):
    answer = extract_answer(response_text)
    if answer is None:
        return STATUS_NO_ANSWER
    return answer == canonical_answer(gold_answer)


judge.statuses = (STATUS_NO_ANSWER,)  # every status besides "correct" and "wrong" it may return
