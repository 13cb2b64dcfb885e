"""用户输入错误：一行说清是哪个文件、哪一行或哪个参数，以及怎么改。"""


class UserError(Exception):
    """用户可修正的错误（坏文件、坏参数、未知模型）；cli 把它变成一行 stderr + 退出码 2。"""


def brief(e: BaseException | str, limit: int = 160) -> str:
    """库的异常 -> 放进一行错误的原因：消息第一个非空行（至多 limit 字）；消息为空（不带文字的 assert）时是类型名。
    直接写 str(e).splitlines()[0] 遇到空消息自己抛 IndexError：本该一行的错误变成了 traceback。"""
    line = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
    return line[:limit] if line else type(e).__name__
