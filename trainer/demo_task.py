"""The bundled narrow task: route a support ticket to one of five queues.

``loragate data make-task OUT.jsonl`` writes it in the chat ``messages`` format: a system
message with the instruction and the routing rule, the customer's ticket as the user message,
and the queue name as the assistant's answer. Tickets are composed from independent parts
(greeting, background, request, detail, sign-off) filled with order numbers, amounts, products
and names, so few two are alike. The background sentence often talks about another queue's
topic ("I paid with my Visa card ... the blender won't turn on"): keyword matching fails, and
the stated rule (the customer's request decides) is what a small model has to learn.

About 1% of the lines are planted exact duplicates (case and spacing changed) and 1% near
duplicates (a small edit), as real exports have, so ``data prepare`` has something to remove.
Everything follows from the seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from .dedup import jaccard, shingles

QUEUES = ("billing", "shipping", "returns", "technical", "account")
SYSTEM = (
    "Route the customer's support ticket to one queue and answer with its name only: billing (charges, "
    "invoices, payments), shipping (delivery, tracking), returns (sending back, exchanges, refunds for "
    "returns), technical (something not working), account (sign-in, profile, closing it). When several "
    "topics come up, the customer's request decides."
)
# Short on purpose: it is in every example, and on CPU the sequence length is the training time.
DUPLICATE_SHARE = 0.01  # of each kind, exact and near

_REQUESTS = {
    "billing": [
        "I was charged twice for order {order}, can you fix that?",
        "Why is there a charge of {amount} on my card from you?",
        "Please send me an invoice for order {order}.",
        "My {card} card was declined but the money still left my account.",
        "How do I change the card you bill every month?",
        "My subscription went up to {amount} without any notice, please explain the fee.",
        "Can I pay for order {order} in instalments?",
        "I need an invoice with my company name {company} on it.",
        "You billed me {amount} for a plan I cancelled in {month}.",
        "Please remove the late fee from my {month} statement.",
        "The discount code was not applied and I paid the full {amount}.",
        "Can I switch my payment method from {card} to bank transfer?",
    ],
    "shipping": [
        "Where is my order {order}? It was due on {day}.",
        "The tracking for order {order} has not moved in {n} days.",
        "Can you deliver the {product} to my {place} instead?",
        "The parcel shows as delivered but there is nothing at my door.",
        "How long does express delivery to {city} take?",
        "The courier left my {product} at the wrong address.",
        "Can I move the delivery of order {order} to {day}?",
        "Do you ship to {city}, and what does it cost to get there?",
        "Order {order} is {n} days late, when will it arrive?",
        "I need to change the delivery address for order {order} before it leaves.",
        "The driver never came on {day} although I stayed home all day.",
        "Which courier is bringing my {product}? I cannot find a tracking number.",
    ],
    "returns": [
        "I would like to send back the {product}, it is the wrong size.",
        "Can I get a return label for order {order}?",
        "How do I exchange my {product} for another colour?",
        "I sent the {product} back {n} days ago, when will I get the refund for it?",
        "Is it too late to return a {product} I bought in {month}?",
        "The {product} is not what I expected and I want to return it.",
        "Can I return the {product} at your store in {city}?",
        "Please swap the {product} from order {order} for a bigger size.",
        "I received the {product} twice and want to send one back.",
        "What is your return policy for an opened {product}?",
        "The return form for order {order} will not accept my reason, how else can I send it back?",
        "I want to return the gift {name} gave me, a {product}, for store credit.",
    ],
    "technical": [
        "My {product} will not turn on since {day}.",
        "The {app} app crashes every time I open my orders.",
        "How do I connect the {product} to my wifi?",
        "I get error {code} when I try to pay in the app.",
        "The {product} makes a loud noise and stops after a minute.",
        "The firmware update failed on my {product} and now it blinks red.",
        "The website shows a blank page at checkout on {browser}.",
        "The battery of my {product} is empty after an hour.",
        "The {product} does not pair with my phone over Bluetooth.",
        "The {app} app logs me out and shows error {code}.",
        "The screen of my {product} flickers when it gets warm.",
        "The setup guide for the {product} skips a step and I am stuck.",
    ],
    "account": [
        "I cannot sign in, it says my password is wrong.",
        "Please change the email on my account to {email}.",
        "How do I close my account and delete my data?",
        "I never got the password reset email.",
        "Someone signed in to my account from {city}, it was not me.",
        "Can you merge my two accounts into one?",
        "Please update the phone number on my profile to {phone}.",
        "My account is locked after too many attempts.",
        "I want to change the name on my profile to {name}.",
        "The two-step code never arrives when I log in.",
        "How do I stop the newsletter emails to {email}?",
        "I forgot which email I used to create my account.",
    ],
}
# Background that mentions a queue's topic without asking anything of it: the distractors.
_BACKGROUND = {
    "billing": ["I paid with my {card} card as usual.", "The invoice for order {order} was fine.",
                "You charged me {amount} last week.", "My payment of {amount} went through on {day}."],
    "shipping": ["The parcel arrived on {day}.", "The courier brought order {order} yesterday.",
                 "Delivery to my {place} was quick.", "The tracking said it was delivered on {day}."],
    "returns": ["I returned a {product} last month and that went fine.",
                "I already exchanged one {product} in {month}.", "I still have the return label from {month}."],
    "technical": ["The {app} app works fine otherwise.", "I set up the {product} on {day}.",
                  "I updated the app on {day}.", "The {product} itself works well."],
    "account": ["I log in with {email}.", "I changed my password recently.",
                "My account is under the name {name}.", "I have had an account since {year}."],
}
_GREETINGS = ["Hi,", "Hello,", "Hey there,", "Good morning,", "Dear support,", "Hi team,", "Hello support team,",
              "Good afternoon,", "Hi there,", "Dear customer service,"]
_DETAILS = ["My order number is {order}.", "I use your app on {os}.", "I have been a customer since {year}.",
            "This is the second time I am writing about this.", "It is quite urgent.", "I live in {city}.",
            "You can call me on {phone}.", "I bought it on {day}."]
_SIGN_OFFS = ["Thanks,", "Thank you!", "Regards,", "Cheers,", "Best,", "Thanks in advance,", "Kind regards,",
              "Many thanks,"]
_SLOTS: dict[str, Callable[[random.Random], str]] = {
    "order": lambda r: f"#{r.randint(10000, 99999)}",
    "amount": lambda r: f"${r.randint(5, 400)}.{r.choice(['00', '49', '99'])}",
    "n": lambda r: str(r.randint(3, 14)),
    "code": lambda r: f"{r.choice(['E', 'ERR-', 'X'])}{r.randint(100, 999)}",
    "year": lambda r: str(r.randint(2012, 2024)),
    "phone": lambda r: f"+1 555 {r.randint(100, 999)} {r.randint(1000, 9999)}",
    "email": lambda r: f"{r.choice(_NAMES).lower()}.{r.randint(1, 99)}@{r.choice(['mail.com', 'post.net'])}",
    "name": lambda r: r.choice(_NAMES),
    "product": lambda r: r.choice(["blender", "kettle", "headphones", "desk lamp", "rice cooker", "smart watch",
                                   "vacuum cleaner", "coffee grinder", "router", "speaker", "toaster", "air fryer",
                                   "e-reader", "keyboard", "webcam", "fan heater", "hair dryer", "drone"]),
    "card": lambda r: r.choice(["Visa", "Mastercard", "Amex", "debit", "credit"]),
    "city": lambda r: r.choice(["Leeds", "Austin", "Lyon", "Porto", "Dublin", "Denver", "Malmo", "Graz", "Cork",
                                "Boise", "Turin", "Ghent", "Bergen", "Tampa", "Perth", "Quebec"]),
    "day": lambda r: r.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]),
    "month": lambda r: r.choice(["January", "February", "March", "April", "May", "June", "July", "August",
                                 "September", "October", "November", "December"]),
    "place": lambda r: r.choice(["office", "neighbour", "parents' house", "pickup point", "work address"]),
    "app": lambda r: r.choice(["iPhone", "Android", "tablet", "desktop"]),
    "os": lambda r: r.choice(["iOS 17", "Android 14", "an iPad", "a Chromebook"]),
    "browser": lambda r: r.choice(["Chrome", "Firefox", "Safari", "Edge"]),
    "company": lambda r: r.choice(["Bright Ltd", "Norte SA", "Kite GmbH", "Oak & Co"]),
}
_NAMES = ["Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko", "Liam",
          "Maya", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(**{name: make(rng) for name, make in _SLOTS.items() if "{" + name + "}" in template})


def make_ticket(queue: str, rng: random.Random) -> str:
    """One ticket whose request belongs to ``queue``; often with another queue's background."""
    request = _fill(rng.choice(_REQUESTS[queue]), rng)
    body = [request]
    if rng.random() < 0.6:
        other = rng.choice([q for q in QUEUES if q != queue])
        background = _fill(rng.choice(_BACKGROUND[other]), rng)
        body = [background, request] if rng.random() < 0.75 else [request, background]
    if rng.random() < 0.5:
        body.append(_fill(rng.choice(_DETAILS), rng))
    parts = [rng.choice(_GREETINGS)] if rng.random() < 0.7 else []
    parts.append(" ".join(body))
    if rng.random() < 0.6:
        parts.append(f"{rng.choice(_SIGN_OFFS)} {rng.choice(_NAMES)}")
    ticket = "\n".join(parts) if rng.random() < 0.5 else " ".join(parts)
    return ticket.lower() if rng.random() < 0.08 else ticket  # some people type in lower case


def _row(ticket: str, queue: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ticket},
                         {"role": "assistant", "content": queue}]}


def _exact_copy(ticket: str, rng: random.Random) -> str:
    """The same ticket as a re-export shows it: other case and spacing."""
    return rng.choice([ticket.upper(), ticket.lower(), "  " + ticket.replace(" ", "  "), ticket + "\n"])


def _near_copy(ticket: str, rng: random.Random) -> str:
    """The same ticket sent again with a small edit."""
    edits = [lambda t: t + " Please help.", lambda t: t + " Thanks!", lambda t: t.replace(".", "!", 1),
             lambda t: t.rstrip(".!?") + "??", lambda t: "Hello again, " + t]
    return rng.choice(edits)(ticket)


def make_task(n: int = 3000, seed: int = 0) -> list[dict]:
    """``n`` rows in the ``messages`` format, balanced over the queues, duplicates included."""
    rng = random.Random(seed)
    planted = int(n * DUPLICATE_SHARE)
    originals = n - 2 * planted
    queues = [QUEUES[i % len(QUEUES)] for i in range(originals)]
    rng.shuffle(queues)
    tickets = [(make_ticket(q, rng), q) for q in queues]
    copies = []
    for i in rng.sample(range(originals), planted):
        copies.append((_exact_copy(tickets[i][0], rng), tickets[i][1]))
    for i in rng.sample(range(originals), planted):
        edited = _near_copy(tickets[i][0], rng)
        # Only edits small enough to stay a near duplicate at the default threshold are planted.
        if jaccard(shingles(edited), shingles(tickets[i][0])) < 0.85:
            edited = tickets[i][0] + " Thanks!"
        copies.append((edited, tickets[i][1]))
    for copy in copies:
        tickets.insert(rng.randint(len(tickets) // 2, len(tickets)), copy)
    return [_row(ticket, queue) for ticket, queue in tickets]


def write_task(path: Path, n: int = 3000, seed: int = 0) -> int:
    rows = make_task(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)
